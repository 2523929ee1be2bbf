import sys

from separeg.cli import main

sys.exit(main())
