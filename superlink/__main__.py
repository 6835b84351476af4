from superlink.launch import main

main()
