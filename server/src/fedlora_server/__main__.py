import sys

from fedlora_server.cli import main

sys.exit(main())
