import sys

from fedlora_worker.lab.cli import main

sys.exit(main())
