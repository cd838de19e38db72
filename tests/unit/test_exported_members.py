"""Pins what the shared package exports, so a rename is a deliberate API change."""

import services.common


def test_services_common_exports() -> None:
    assert set(services.common.__all__) == {
        "AlreadyExistsError",
        "ApprovalConfig",
        "ConfigError",
        "DeadlineExceededError",
        "FailedPreconditionError",
        "InferenceConfig",
        "InvalidArgumentError",
        "KnowledgeConfig",
        "MeshConfig",
        "MeshError",
        "MeshServer",
        "NotFoundError",
        "OutOfRangeError",
        "PermissionDeniedError",
        "PlannerConfig",
        "ResourceExhaustedError",
        "ServerConfig",
        "ToolsConfig",
        "UnavailableError",
        "create_channel",
        "load_config",
        "rpc_error_to_mesh_error",
        "serve",
    }
    for name in services.common.__all__:
        assert getattr(services.common, name) is not None


def test_generated_stubs_import_as_a_normal_package() -> None:
    from meshpilot.inference.v1 import inference_pb2_grpc
    from meshpilot.knowledge.v1 import knowledge_pb2_grpc
    from meshpilot.planner.v1 import planner_pb2_grpc
    from meshpilot.tools.v1 import tools_pb2_grpc

    stubs = [
        planner_pb2_grpc.PlannerServiceStub,
        tools_pb2_grpc.ToolsServiceStub,
        knowledge_pb2_grpc.KnowledgeServiceStub,
        inference_pb2_grpc.InferenceServiceStub,
    ]
    assert all(callable(stub) for stub in stubs)
