import sys

from msgd.tap import main

sys.exit(main())
