"""Row 2: adapter.predict alone, on decoded images, against the bare forward at the same batch and precision;
and at batch 16 the forward pass and its rows without annotations, the ceiling of row 1."""
from bench.speed.common import bare_forward, bare_network, median_seconds, row


def rows(cfg, device, cuda, items, adapter):
    tensors = [adapter.prepare_item_func(item) for item in items]
    network = bare_network(adapter, cfg, device)
    n, runs = len(tensors), cfg['runs']
    print('2. adapter.predict alone (decoded images) vs bare forward, same batch and precision')
    for batch in (2, 16):
        chunks = [tensors[i:i + batch] for i in range(0, n, batch)]
        ours = n / median_seconds(lambda: [adapter.predict(c) for c in chunks], device, runs)
        plain = n / median_seconds(lambda: [bare_forward(network, c, device, cuda) for c in chunks], device, runs)
        row(f'batch {batch}', ours, plain)
        if batch == 16:  # predict less its annotations: the ceiling of row 1
            ours = n / median_seconds(lambda: [adapter._detect(c) for c in chunks], device, runs)
            row('batch 16, the forward pass and its rows only (no annotations)', ours, plain)
