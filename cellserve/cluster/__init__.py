"""Many models on many devices: the deployments `cellserve bench cluster` compares, in the
simulator (workload.py: the sessions and their traces; systems.py: Nexus planning and the three
baselines as simulated deployments; clipper.py and ray_serve.py: the baselines' controllers).
Every figure made from these is simulated."""
