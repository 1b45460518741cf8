from immunize.main import main

main()
