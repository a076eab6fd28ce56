import sys

from fedlora_worker.cli import main

sys.exit(main())
