"""`python -m zhtrain.tokenizer train|merge|extend ...`"""

import sys

from zhtrain.errors import run_command
from zhtrain.tokenizer import main

run_command(main, sys.argv[1:])
