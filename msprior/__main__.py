from msprior.cli import main

main()
