from fedtune.metrics.cli import main

main()
