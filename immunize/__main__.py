from immunize.cli import main

main()
