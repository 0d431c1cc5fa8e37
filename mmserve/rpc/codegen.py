"""Regenerates worker_pb2.py / worker_pb2_grpc.py from worker.proto (needs grpcio-tools)."""

from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).parent


def main() -> int:
    root = HERE.parents[1]
    return protoc.main(["protoc", f"-I{root}", f"--python_out={root}", f"--grpc_python_out={root}",
                        str((HERE / "worker.proto").relative_to(root))])


if __name__ == "__main__":
    raise SystemExit(main())
