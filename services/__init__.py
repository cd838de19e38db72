"""MeshPilot's gRPC services: planner, tools, knowledge and inference, plus what they share (services.common)."""
