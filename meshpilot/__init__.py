"""MeshPilot: the generated API (meshpilot.<service>.v1) and the `meshpilot` command line."""
