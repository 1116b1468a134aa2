from quantlab.face.cli import main
main()
