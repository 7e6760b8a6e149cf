"""CUDA-graph replay of the decode forward.

On a GPU a decode step of a 7B model is launch-bound (tens of ms of Python and kernel launches for a few ms
of memory traffic). The slot cache never changes shape while decoding, so the whole forward can be captured
once per query length and replayed: inputs are copied into static buffers, the graph writes the new KV into
the (static) cache tensors and the logits into a static output.
"""

from __future__ import annotations

import torch


class GraphedForward:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graphs: dict[tuple, tuple] = {}

    def _forward(self, ids, pos, mask):
        return self.model(
            input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache, use_cache=True, logits_to_keep=1
        ).logits

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        key = (tuple(ids.shape), tuple(mask.shape), self.cache.keys.data_ptr())
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, pos, mask)
        static_ids, static_pos, static_mask, static_slots, graph, logits = self.graphs[key]
        static_ids.copy_(ids)
        static_pos.copy_(pos)
        static_mask.copy_(mask)
        static_slots.copy_(self.cache.write_slots)
        self.cache.write_slots = static_slots
        graph.replay()
        return logits

    def _capture(self, ids, pos, mask):
        static = [ids.clone(), pos.clone(), mask.clone(), self.cache.write_slots.clone()]
        self.cache.write_slots = static[3]
        # warm-up on a side stream (writes this step's KV into this step's slots: replay writes the same)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(*static[:3])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(*static[:3])
        return (*static, graph, logits)
