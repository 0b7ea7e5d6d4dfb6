import sys

from seqrec.cli import main

sys.exit(main())
