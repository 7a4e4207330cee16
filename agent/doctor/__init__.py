"""``outpost-agent doctor``: the local checks (``checks``), the network ones (``network``), and one result line each (``result``)."""
