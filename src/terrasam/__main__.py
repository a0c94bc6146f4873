from terrasam.cli import main

main()
