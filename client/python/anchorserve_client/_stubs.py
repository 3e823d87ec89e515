"""Loads the generated protobuf and gRPC modules of anchorserve.v1.

They are generated, never committed: by ``client/python/generate_stubs.sh`` into the package's
``_gen`` directory, or by the CMake build into ``<build>/client/python/gen`` (the tests point
``ANCHORSERVE_CLIENT_GEN_DIR`` there).
"""

import os
import sys

_GEN_DIR = os.environ.get('ANCHORSERVE_CLIENT_GEN_DIR') or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '_gen')

if _GEN_DIR not in sys.path:
    sys.path.insert(0, _GEN_DIR)

try:
    from anchorserve.v1 import anchorserve_pb2  # noqa: E402
    from anchorserve.v1 import prefill_pb2  # noqa: E402
    from anchorserve.v1 import prefill_pb2_grpc  # noqa: E402
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        f'anchorserve_client: the generated anchorserve.v1 modules are missing from {_GEN_DIR} '
        f'({error}); run client/python/generate_stubs.sh (needs protobuf-compiler-grpc) or set '
        'ANCHORSERVE_CLIENT_GEN_DIR') from error

__all__ = ['anchorserve_pb2', 'prefill_pb2', 'prefill_pb2_grpc']
