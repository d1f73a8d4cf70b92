import sys

from contrastive.report.build import main

sys.exit(main())
