from adore.bench.cli import main

main()
