"""How ADORE's controller scores tokens in a session (`Scoring`, one class per kind of controller): the per-token
state it keeps as tokens enter, and its scores of any history tokens for the current query. The attention probe
can score from page summaries (`PagedProbeScoring`) so that a step's cost does not grow with the history."""

from __future__ import annotations

import torch

from adore.controller import AttentionProbe, Controller, newest_valid, token_logsumexp, token_minor
from adore.engine.columns import at_columns
from adore.engine.pages import PageSummary, by_page
from adore.methods.base import State

SHORTLIST = 4  # page_summary's default: candidate pages rescored exactly per page picked (per token, for token picks)
inf = float("inf")


class Scoring:
    """A controller in a session: `start` adds the state it keeps, `arrive` / `update` follow the fed tokens
    (Method's hooks of the same names), `score` gives the (B, k) raw scores of a `Tokens` view. Every kind keeps
    z_i per history column (`tokens["z"]`) and the state `encode` carries (`state.h`)."""

    def __init__(self, net: Controller):
        self.net = net

    def new_keys(self, batch_size: int, length: int, device) -> torch.Tensor:
        """Zeros for z_i, (B, T, state_width): row-major, so that a token's z is gathered as one contiguous row."""
        return torch.zeros(batch_size, length, self.net.state_width, device=device)

    def start(self, state: State, model) -> None:
        pass

    def arrive(self, state: State, arriving) -> None:
        pass

    def update(self, state: State, entered, x: torch.Tensor) -> torch.Tensor:
        """Encode the tokens just fed (x: (B, n, d_model)), once; returns their z (B, n, state_width)."""
        z, state.h = self.net.encode(x, entered.valid, state.h)
        state.tokens["z"][:, entered.cols[0]] = z
        return z

    def assume(self, state: State, cols: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        pass

    def score(self, state: State, tokens) -> torch.Tensor:
        raise NotImplementedError

    def release_scores(self, state: State, tokens) -> torch.Tensor:
        """(B, k) scores of the cached tokens `tokens` for the release: `score`'s (a kind may keep them from the pick)."""
        return self.score(state, tokens)

    def page_scores(self, state, tokens, page_size: int, released: torch.Tensor, reduce, exact):
        """(B, pages) page scores for a page pick; `exact` is the method's default (Method.page_scores)."""
        return exact(state, tokens, page_size, released, reduce)

    def pick_scores(self, state, tokens, released: torch.Tensor, R: int) -> torch.Tensor:
        """(B, seen) scores for a pick of R `released` tokens among `tokens` (all seen): every one's."""
        return self.score(state, tokens)


class GRUScoring(Scoring):
    """The GRU scorer: each asked token's z_i, scored for the newest token, whose state h is the query."""

    def score(self, state, tokens):
        z = state.tokens["z"]
        z = z.gather(1, tokens.cols[..., None].expand(-1, -1, z.shape[2]))
        query_z = state.h[:, None] if self.net.config.query else None  # (B, 1, width): the newest token's state
        return self.net.logits(z, tokens.positions, tokens.query_pos, query_z)


class ProbeScoring(Scoring):
    """The attention probe: keys with their positions and flags per history column, and the query of the token
    being fed, made before its forward (from x_{t-1} and its input embedding), so the rebuild pick is for it.
    Scores are normalised over every history token. A decode step asks twice with one query (the rebuild pick
    before the forward, the release after it), so the query's per-head scores over the history are kept
    (`state.head_scores`, masked where it may not read, with their log normaliser `state.log_norm`) and the token
    fed joins both when they are next read (`state.joining`; a release by attention never reads them): the
    history's keys are read, and normalised over, once a step, not twice. The keys are kept token-minor, so that
    this read is one bmm at memory bandwidth (`head_dots`)."""

    def new_keys(self, batch_size, length, device):
        return token_minor(batch_size, length, self.net.state_width, device)

    def start(self, state, model):
        B, T = state.tokens["z"].shape[:2]
        device = state.tokens["z"].device
        state.tokens["pos"] = torch.zeros(B, T, dtype=torch.long, device=device)
        state.tokens["filled"] = torch.zeros(B, T, dtype=torch.bool, device=device)
        state.embed = model.get_input_embeddings()
        state.query = None  # (B, heads * head_dim): the query of the newest token
        state.head_scores = None  # (B, T, heads): the query's per-head scores of every history column, or None
        state.allowed = state.log_norm = None  # with head_scores: the columns it may read, its (B, 1, heads) normaliser
        state.joining = None  # a decode step's fed token, not yet joined to head_scores: (z, entered)

    def arrive(self, state, arriving):
        """The query of the newest arriving token t: x_{t-1} (known) and token t's input embedding."""
        has, newest = newest_valid(arriving.valid)
        state.embedded = state.embed(arriving.ids.gather(1, newest[:, None]))[:, 0].float()  # (B, d_model)
        previous = torch.zeros_like(state.embedded) if state.h is None else state.h
        self._set_query(state, has, previous)
        state.head_scores = state.joining = None

    def update(self, state, entered, x):
        z = super().update(state, entered, x)
        cols = entered.cols[0]
        state.tokens["pos"][:, cols] = entered.positions
        state.tokens["filled"][:, cols] = entered.valid
        if entered.valid.shape[1] == 1:  # a decode step: the query stays; the fed token joins its scores if read
            state.joining = (z, entered) if state.head_scores is not None else None
            return z
        # a feed of several tokens (a prompt): the query's x_{t-1} is the second newest of them
        before = entered.valid.clone()
        before.scatter_(1, newest_valid(entered.valid)[1][:, None], False)
        two, second = newest_valid(before)
        self._set_query(state, two, x.gather(1, second[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0])
        state.head_scores = state.joining = None
        return z

    def assume(self, state, cols, positions, length):
        state.head_scores = state.joining = None

    def _set_query(self, state, rows: torch.Tensor, previous: torch.Tensor) -> None:
        query = self.net.queries(previous, state.embedded)
        state.query = query if state.query is None else torch.where(rows[:, None], query, state.query)

    def _read_history(self, state, tokens) -> None:
        """The query's per-head scores of every history column fed so far (`tokens.length`: not the capacity past
        it, which a stream's session holds for turns to come) and their log normaliser, once per query."""
        if state.head_scores is None:
            z, pos, filled = (state.tokens[name][:, : tokens.length] for name in ("z", "pos", "filled"))
            s = self.net.head_scores(z, pos, tokens.query_pos, state.query)
            state.allowed = self.net.allowed(pos, tokens.query_pos, filled)
            s.masked_fill_(~state.allowed[..., None], -1e9)
            state.head_scores, state.log_norm = s, token_logsumexp(s)  # (B, T, heads), (B, 1, heads)
        elif state.joining is not None:  # the fed token's column held a masked score, which added nothing to log_norm
            z, entered = state.joining
            own = self.net.head_scores(z, entered.positions, entered.query_pos, state.query)  # (B, 1, heads)
            allowed = self.net.allowed(entered.positions, entered.query_pos, entered.valid)
            own.masked_fill_(~allowed[..., None], -1e9)
            cols = entered.cols[0]
            state.head_scores[:, cols], state.allowed[:, cols] = own, allowed
            state.log_norm = torch.logaddexp(state.log_norm, own)
        state.joining = None

    def pick_scores(self, state, tokens, released, R):
        """Every seen column's score, in column order: the kept scores sliced, not gathered column by column."""
        self._read_history(state, tokens)
        seen = tokens.cols.shape[1]
        mixed = self.net.mixed_normalised_(state.head_scores[:, :seen] - state.log_norm)
        return mixed.masked_fill(~state.allowed[:, :seen], float("-inf"))

    def score(self, state, tokens):
        self._read_history(state, tokens)
        cols = tokens.cols
        if 2 * cols.shape[1] > state.head_scores.shape[1]:  # most of the history (the rebuild pick): all, then pick
            mixed = self.net.mixed_normalised_(state.head_scores - state.log_norm).gather(1, cols)
        else:  # a few columns (the release asks the cache's)
            heads = cols[..., None].expand(-1, -1, state.head_scores.shape[2])
            mixed = self.net.mixed_normalised_(state.head_scores.gather(1, heads) - state.log_norm)
        return mixed.masked_fill(~state.allowed.gather(1, cols), float("-inf"))  # (B, k)


class PagedProbeScoring(ProbeScoring):
    """The probe with page summaries (`page_summary`): the asked tokens are normalised over the cache and the page
    summaries, and a pick ranks pages by their bounds, then rescores the best few exactly from their members' keys:
    O(pages) per step, not O(history). A page pick takes whole pages; a token pick (page_size null) the R best
    tokens of the `shortlist` x R best-bounded pages (Quest's page shortlist, Tang et al. ICML 2024, for single
    tokens). `shortlist`: candidate pages rescored exactly per page picked (per token, for token picks)."""

    def __init__(self, net: AttentionProbe, page_size: int, R: int, shortlist: int):
        super().__init__(net)
        self.page_size, self.R, self.shortlist = page_size, R, shortlist  # page_size: the summaries' pages

    def new_keys(self, batch_size, length, device):
        """Row-major: this scoring gathers its keys by column (the cache's, the shortlisted pages'), never all."""
        return Scoring.new_keys(self, batch_size, length, device)

    def start(self, state, model):
        super().start(state, model)
        B, T, width = state.tokens["z"].shape
        state.pages = PageSummary(B, width, self.page_size, state.tokens["z"].device)
        # per query: its log normaliser (B, 1, heads), estimated once (`_log_norm`), and the per-head scores of the
        # columns it scored (the cache, the pick's candidates, the fed token), which the release reads back
        state.paged_norm = None
        state.tokens["scored"] = torch.zeros(B, T, self.net.config.heads, device=state.tokens["z"].device)

    def arrive(self, state, arriving):
        super().arrive(state, arriving)
        state.paged_norm = None

    def update(self, state, entered, x):
        """The fed keys enter their pages' summaries; a decode step's token joins its query's normaliser exactly, as
        `ProbeScoring` joins it to the kept scores, so the release reuses the pick's estimate."""
        z = super().update(state, entered, x)
        state.pages.add(entered.cols[0], z, entered.positions, entered.valid, state.tokens["z"].shape[1])
        if entered.valid.shape[1] == 1 and state.paged_norm is not None:
            own = self.net.head_scores(z, entered.positions, entered.query_pos, state.query)  # (B, 1, heads)
            state.tokens["scored"][:, entered.cols[0]] = own
            allowed = self.net.allowed(entered.positions, entered.query_pos, entered.valid)
            state.paged_norm = torch.logaddexp(state.paged_norm, own.masked_fill(~allowed[..., None], -inf))
        else:  # a prompt's new query, or a step that scored nothing yet: the release takes the normaliser afresh
            state.paged_norm = None
        return z

    def assume(self, state, cols, positions, length):
        """The assumed keys enter their pages' summaries."""
        super().assume(state, cols, positions, length)
        state.paged_norm = None
        z = state.tokens["z"][:, cols]
        state.pages.add(cols, z, positions, torch.ones_like(positions, dtype=torch.bool), length)

    def score(self, state, tokens):
        z = at_columns(state.tokens["z"], tokens.cols)
        return self.net.paged_logits(z, tokens.positions, tokens.query_pos, state.query, self._log_norm(state, tokens))

    def release_scores(self, state, tokens):
        """The cached tokens' scores read back from this query's scored columns: every token cached now was cached,
        picked from the candidates or fed since the normaliser was taken (`_log_norm` takes it first if not)."""
        log_norm = self._log_norm(state, tokens)
        scores = at_columns(state.tokens["scored"], tokens.cols)
        return self.net.mixed(scores - log_norm, tokens.positions <= tokens.query_pos)

    def page_scores(self, state, tokens, page_size, released, reduce, exact):
        """Each open page's bound from its summary (adore.engine.pages), then the shortlist x (R / page_size) best
        bounds rescored exactly from their members' keys (the bound alone ranks loosely) and reduced as
        Method.page_scores reduces them: O(pages + shortlist x R) keys read a step, whatever the history."""
        bound, open_pages, candidates, cols, inside, scores = self._shortlist(
            state, tokens, released, self.shortlist * max(self.R // page_size, 1)
        )
        shape = (scores.shape[0], -1, page_size)
        rescored = reduce(scores.view(shape), (inside & released.gather(1, cols)).view(shape))  # (B, c)
        return torch.full_like(bound, -inf).scatter(1, candidates, rescored).masked_fill(~open_pages, -inf)

    def pick_scores(self, state, tokens, released, R):
        """Exact scores of the members of the shortlist x R best-bounded pages, -inf for every other token:
        O(pages + shortlist x R x page_size) keys read a step, whatever the history."""
        *_, cols, _, scores = self._shortlist(state, tokens, released, self.shortlist * R)
        seen = tokens.cols.shape[1]
        out = scores.new_full((scores.shape[0], seen + 1), -inf)  # the last column takes the padding past `seen`
        cols = torch.where(scores > -inf, cols, seen)
        return out.scatter_(1, cols, scores)[:, :seen]

    def _shortlist(self, state, tokens, released, count: int):
        """The pages' bounds (B, pages) (-inf where nothing is released) and which are open (released members), the
        `count` best pages (B, c), their members' columns (B, c * page_size), which lie within the `seen`, and their
        exact scores (-inf past `seen` or unfilled)."""
        P, seen = self.page_size, tokens.cols.shape[1]
        open_pages = by_page(released, P, False).any(2)  # (B, pages)
        pages = open_pages.shape[1]
        log_norm = self._log_norm(state, tokens)
        bound = self.net.page_logits(state.pages, pages, tokens.query_pos, state.query, log_norm)
        bound = bound.masked_fill(~open_pages, -inf)
        candidates = bound.topk(min(count, pages), dim=1).indices  # (B, c)
        cols = (candidates[..., None] * P + torch.arange(P, device=bound.device)).flatten(1)
        inside = cols < seen
        cols = cols.clamp(max=seen - 1)
        z = at_columns(state.tokens["z"], cols)  # (B, c * P, width)
        positions = state.tokens["pos"].gather(1, cols)
        own = self.net.head_scores(z, positions, tokens.query_pos, state.query)  # (B, c * P, heads)
        state.tokens["scored"].scatter_(1, cols[..., None].expand_as(own), own)
        scores = self.net.mixed(own - log_norm, positions <= tokens.query_pos)
        scores = scores.masked_fill(~(inside & state.tokens["filled"].gather(1, cols)), -inf)
        return bound, open_pages, candidates, cols, inside, scores

    def _log_norm(self, state, tokens):
        """The per-head log normaliser for this query: exact over the cache, estimated over the released, as they
        stand at the query's first ask (a decode step's pick; the release after its forward reuses it, with the
        fed token joined by `update`)."""
        if state.paged_norm is None:
            cols = tokens.cached  # (B, C), -1: empty slot
            cached = cols.clamp(min=0)
            own = self.net.head_scores(
                at_columns(state.tokens["z"], cached),
                state.tokens["pos"].gather(1, cached),
                tokens.query_pos,
                state.query,
            )
            state.tokens["scored"].scatter_(1, cached[..., None].expand_as(own), own)
            pages = -(-tokens.length // self.page_size)
            state.paged_norm = self.net.log_normaliser(state.pages, pages, tokens.query_pos, state.query, own, cols)
        return state.paged_norm
