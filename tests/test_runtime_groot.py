"""An Isaac-GR00T policy client, unchanged, against this server (through the config's key mapping)."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from runtime.server import Server
from runtime_fakes import FakeLoader, deployment, model_dict
from runtime_wire import groot_pack, groot_unpack

GROOT = {"video": {"video.ego_view": "base_0_rgb", "video.wrist_view": "left_wrist_0_rgb"},
         "state": ["state.left_arm", "state.left_hand"], "actions": {"left_arm": 6, "left_hand": 1}}


class GrootPolicyClient:
    """Isaac-GR00T N1.6's PolicyClient as it behaves on the wire (gr00t/policy/server_client.py):
    a REQ socket, single-frame msgpack with .npy arrays, `{"error": ...}` replies raise."""

    def __init__(self, endpoint: str, api_token: str | None = None):
        self.socket = zmq.Context.instance().socket(zmq.REQ)
        self.socket.linger = 0
        self.socket.rcvtimeo = 5000  # the real client sets none; a test must not hang
        self.socket.connect(endpoint)
        self.api_token = api_token

    def call_endpoint(self, endpoint: str, data: dict | None = None, requires_input: bool = True):
        request: dict = {"endpoint": endpoint}
        if requires_input:
            request["data"] = data
        if self.api_token:
            request["api_token"] = self.api_token
        self.socket.send(groot_pack(request))
        response = groot_unpack(self.socket.recv())
        if isinstance(response, dict) and "error" in response:
            raise RuntimeError(f"Server error: {response['error']}")
        return response

    def ping(self) -> bool:
        self.call_endpoint("ping", requires_input=False)
        return True

    def get_action(self, observation: dict, options: dict | None = None):
        response = self.call_endpoint("get_action", {"observation": observation, "options": options})
        return tuple(response)

    def reset(self, options: dict | None = None):
        return self.call_endpoint("reset", {"options": options})


@pytest.fixture
def groot_endpoint():
    with Server(deployment(model_dict(groot=GROOT)), loader=FakeLoader()) as server:
        yield server.bound[0]


def nested_observation(arm: np.ndarray, hand: float) -> dict:
    rng = np.random.default_rng(0)
    return {
        "video": {"ego_view": rng.integers(0, 256, (1, 1, 64, 64, 3), dtype=np.uint8),
                  "wrist_view": rng.integers(0, 256, (1, 1, 64, 64, 3), dtype=np.uint8)},
        "state": {"left_arm": arm.reshape(1, 1, 7), "left_hand": np.array([[[hand]]], dtype=np.float32)},
        "language": {"annotation.human.task_description": [["pick up the red cube"]]},
    }


def test_groot_client_gets_a_correct_reply(groot_endpoint):
    client = GrootPolicyClient(groot_endpoint, api_token="ignored-for-inference")
    assert client.ping()
    arm = np.arange(7, dtype=np.float32)
    action, info = client.get_action(nested_observation(arm, 0.5))
    assert set(action) == {"left_arm", "left_hand"} and info == {}
    assert action["left_arm"].shape == (1, 10, 6) and action["left_hand"].shape == (1, 10, 1)
    # the fake's actions are the state (arm then hand) + 1000: the mapping went both ways in order
    state = np.concatenate([arm, [0.5]]).astype(np.float32)
    np.testing.assert_array_equal(action["left_arm"][0, 0], state[:6] + 1000)
    np.testing.assert_array_equal(action["left_hand"][0, 0], state[6:7] + 1000)
    assert isinstance(client.reset(), dict)


def test_groot_flat_keys(groot_endpoint):
    """GR00T's simulation wrappers send flat `video.x` / `state.x` keys with a time dimension."""
    arm = np.arange(7, dtype=np.float32) * 2
    nested = nested_observation(arm, 2.0)
    flat = {f"{group}.{k}": v[0] for group in ("video", "state") for k, v in nested[group].items()}
    flat["annotation.human.task_description"] = ["pick up the red cube"]
    action, _ = GrootPolicyClient(groot_endpoint).get_action(flat)
    np.testing.assert_array_equal(action["left_arm"][0], np.tile(arm[:6] + 1000, (10, 1)))
    np.testing.assert_array_equal(action["left_hand"][0, :, 0], np.full(10, arm[6] + 1000))


def test_groot_errors_raise_in_the_groot_client(groot_endpoint):
    client = GrootPolicyClient(groot_endpoint)
    obs = nested_observation(np.zeros(7, np.float32), 0.0)
    del obs["video"]["wrist_view"]
    with pytest.raises(RuntimeError, match="video.wrist_view"):
        client.get_action(obs)
    obs = nested_observation(np.zeros(7, np.float32), 0.0)
    obs["video"]["ego_view"] = np.zeros((2, 1, 8, 8, 3), np.uint8)
    with pytest.raises(RuntimeError, match="batch size must be 1"):
        client.get_action(obs)
    with pytest.raises(RuntimeError, match="Unknown endpoint|unknown endpoint"):
        client.call_endpoint("kill", requires_input=False)  # never lets a client stop the server
    assert client.ping()


def test_model_without_mapping_says_so():
    with Server(deployment(), loader=FakeLoader()) as server:
        with pytest.raises(RuntimeError, match="groot"):
            GrootPolicyClient(server.bound[0]).get_action(nested_observation(np.zeros(7, np.float32), 0.0))
