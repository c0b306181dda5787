# A config's plan: what the layer loop needs to move one transfer config, built by the cache
# manager in one function from the config and the route that reaches its cache.

cpdef enum Lane:
    LANE_RUNTIME = 0    # runtime copies on the worker's stream (own memory, or a peer's mapped here)
    LANE_HOST = 1       # the host copy engine's stream (host-to-host copies of a device runtime)
    LANE_PROCESS = 2    # process_vm_writev / process_vm_readv with a process of this host
    LANE_ENGINE = 3     # batched transfers through a transfer engine (another host)


cpdef enum Direction:
    WRITE = 0           # from the cache here into the config's cache (push)
    READ = 1            # from the config's cache into the cache here (pull)


cdef class ConfigPlan:
    """One config of a transfer: the layers of the cache here that it covers, the row inside
    each of its tensors, the copy kind, the lane its bytes travel on and the base and region end
    of each of the other cache's tensors (tensors_per_layer per covered layer: 2, K and V, or
    1, MLA) as this process reaches them.

    pid names the peer process (LANE_PROCESS), link the peer's LinkFlag (None for this
    cluster), engine the channel that queues transfers (LANE_ENGINE: write, read, settle and
    verdict), single makes device copies go run by run (memory of another device, which a batch
    call's one location cannot name)."""

    def __init__(self, *, int first_layer, int stop_layer, size_t row_shift, CopyKind kind,
                 Lane lane, list target_addrs, list target_limits, Direction direction=WRITE,
                 int pid=0, LinkFlag link=None, engine=None, bint single=False,
                 int tensors_per_layer=2):
        cdef int t = tensors_per_layer
        if not 0 <= first_layer <= stop_layer:
            raise ValueError(f"layers [{first_layer}, {stop_layer}) are not a range")
        if t not in (1, 2):
            raise ValueError(f"tensors_per_layer must be 1 or 2, got {t}")
        if len(target_addrs) != t * (stop_layer - first_layer) or len(target_limits) != len(target_addrs):
            raise ValueError(f"{stop_layer - first_layer} layers need {t * (stop_layer - first_layer)} "
                             f"target addresses and limits, got {len(target_addrs)} and "
                             f"{len(target_limits)}")
        if (lane == LANE_ENGINE) != (engine is not None):
            raise ValueError("an engine channel goes with LANE_ENGINE, and only with it")
        if lane == LANE_PROCESS and pid <= 0:
            raise ValueError(f"LANE_PROCESS needs the peer's pid, got {pid}")
        self.first_layer = first_layer
        self.stop_layer = stop_layer
        self.row_shift = row_shift
        self.kind = kind
        self.lane = lane
        self.direction = direction
        self.target_addrs = target_addrs
        self.target_limits = target_limits
        self.pid = pid
        self.link = link
        self.engine = engine
        self.single = single
        self.tensors_per_layer = t
