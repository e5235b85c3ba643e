from diffaccel.cli import main

main()
