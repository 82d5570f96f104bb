import sys

from gpufleet.entry import main

sys.exit(main())
