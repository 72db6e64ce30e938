"""The stand-in engine process: serves the EngineWorkerQueue manager (cross-rank barriers) to the ranks.

Run by the harness as a script (this directory is then ``sys.path[0]``, so ``fastdeploy`` is the stand-in).
Prints ``port <N>`` once it listens, then serves until killed.
"""

import argparse

from fastdeploy.inter_communicator.engine_worker_queue import EngineWorkerQueue


def main():
    parser = argparse.ArgumentParser("stand-in engine server")
    parser.add_argument("--nranks", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--record", default=None, help="JSON-lines file of the ranks' reports")
    args = parser.parse_args()
    queue = EngineWorkerQueue(
        address=("127.0.0.1", args.port), is_server=True, num_client=args.nranks, record_path=args.record
    )
    print(f"port {queue.address[1]}", flush=True)
    queue.serve_forever()


if __name__ == "__main__":
    main()
