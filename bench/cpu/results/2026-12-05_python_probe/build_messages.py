import os, sys, time
sys.path.insert(0, 'os.environ.get("ANCHORSERVE_CLIENT_GEN_DIR", "")')
import numpy as np
from anchorserve.v1 import anchorserve_pb2 as pb
n=16384; chunk=4<<20
tensors=[(pb.TENSOR_NAME_Q, np.random.randint(0,1<<14,size=n*32*128,dtype=np.uint16).tobytes()),(pb.TENSOR_NAME_K, bytes(n*8*128*2)),(pb.TENSOR_NAME_V, bytes(n*8*128*2))]
for rep in range(3):
    t=time.perf_counter(); total=0
    for name,data in tensors:
        view=memoryview(data)
        for off in range(0,len(view),chunk):
            m=pb.AttendStreamRequest(chunk=pb.TensorChunk(tensor=name, offset=off, data=bytes(view[off:off+chunk])))
            total+=len(m.SerializeToString())
    dt=time.perf_counter()-t
    print(f"build+serialize 192 MiB in 4 MiB chunks: {dt*1e3:.1f} ms ({total/dt/1e9:.2f} GB/s)")
    t=time.perf_counter()
    for name,data in tensors:
        view=memoryview(data)
        for off in range(0,len(view),chunk):
            m=pb.AttendStreamRequest(chunk=pb.TensorChunk(tensor=name, offset=off, data=bytes(view[off:off+chunk])))
    dt=time.perf_counter()-t
    print(f"build only: {dt*1e3:.1f} ms")
    # download side: parse 128 MiB of chunk messages
    msgs=[pb.AttendStreamResponse(chunk=pb.TensorChunk(tensor=pb.TENSOR_NAME_Q, offset=0, data=bytes(chunk))).SerializeToString() for _ in range(32)]
    t=time.perf_counter()
    for s in msgs:
        r=pb.AttendStreamResponse.FromString(s); len(r.chunk.data)
    dt=time.perf_counter()-t
    print(f"parse 128 MiB of 4 MiB chunks: {dt*1e3:.1f} ms ({128*2**20/dt/1e9:.2f} GB/s)")
