"""KV transfer between engine instances: leases on P, pulls on D, three transports.

Import from the modules themselves (layout, params, lease, source, transports, host): this
package imports nothing, so that a server process can parse a hand-off (params, layout)
without importing torch.

Both sides hold the deployment secret: every connection to a source starts with a mutual
challenge (handshake.py), and a lease is read or released only with its `lease_token`.

P side, per engine rank (caches in shared memory if CPU, so same-host D can map them):
    caches = allocate_shared_kv_caches(layout, num_blocks, name)     # or CUDA tensors
    leases = LeaseTable()
    source = KVSource(caches, layout, leases, shm_name=name, secret=secret).start()
    # GPU caches: KVSource(..., staging_bytes=256 << 20) adds "host"
    # other hosts: bind_host="0.0.0.0", advertise_host=<this host's IP>
    # a prefill finished: hold its blocks, answer the router (P's server then signs it)
    lease = leases.hold(request_id, block_ids, ttl_s=30)
    params = RemoteKV(engine_id, request_id, block_ids, layout, [source.endpoint()],
                      lease.token)
    return params.to_kv_transfer_params()
    # every step: free what ended (expired, or released by D), once no read pins it
    pool.free(leases.expire())
    # shutdown
    source.close(); unlink_shared_kv_caches(name)

D side, per engine rank (the params already checked: signed, unexpired, this prompt's):
    puller = KVPuller(layout, caches, secret=secret)
    remote = RemoteKV.from_kv_transfer_params(params)   # ValueError if malformed
    try:  # the last D rank's pull asks P to end the lease with its last read
        stats = puller.pull(remote, local_block_ids, first_block=num_prefix_cached_blocks,
                            release=is_last_rank)
    except (TransferError, IncompatibleLayout):
        ...  # prefill locally
    if not stats.released:     # a failed pull, or an earlier rank: tell P explicitly
        puller.release(remote)   # once, after every D rank has pulled (also on failure)
"""
