"""The server side of cmce, one room per job:

- ``models``      architectures (a registry), checkpoint folders, trusted import of users' models
- ``training``    one fit loop: metric learning, distillation, transformation heads, fusion
- ``evaluation``  retrieval metrics, rejection views, the experiment and its report
- ``gallery``     build / add / remove / reproject galleries: encode, index, raw store, engines
- ``data``        datasets, fetching, image folders, gallery item sources
- ``cli``         ``cmce`` and ``cmce-build-gallery``
"""
