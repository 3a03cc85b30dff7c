from mows.cli import main

main()
