from fedlora_worker.cli import entry

entry()
