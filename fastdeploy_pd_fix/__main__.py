import sys

from fastdeploy_pd_fix.cli import main

sys.exit(main())
