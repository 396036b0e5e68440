"""python -m tornado_gateway"""

import sys

from .main import main

sys.exit(main())
