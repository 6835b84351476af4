from supernode.launch import main

main()
