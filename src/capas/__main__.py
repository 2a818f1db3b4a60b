from capas.cli import main

main()
