from dgpo.cli import main

main()
