from autocaption.cli import main

main()
