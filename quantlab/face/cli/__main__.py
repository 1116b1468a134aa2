"""`python -m quantlab.face.cli`, as `quantlab`."""
from . import main

main()
