"""Launch the vla_policy node: `ros2 launch launch/vla_policy.launch.py bundle:=/opt/policy image:=/camera/image_raw`.

An arm (a bundle that observes several cameras + joint_states and declares a joint output):
`ros2 launch launch/vla_policy.launch.py bundle:=/opt/act rate_hz:=30
remap:="images/top:=/top/image_raw images/wrist:=/wrist/image_raw joint_commands:=/arm_controller/commands"`.

Runs the `vla-policy-node` entry point (pip install 'vla-export[ros]') as a process, so it needs only the `launch`
package, not a colcon workspace. On Ctrl-C launch sends SIGINT and the node publishes its last message (a zero Twist;
for a joint output that holds, the last good command) before exiting. Parameters left empty are not passed, so the
bundle's declaration applies. Untested here: the `launch` package is not in this project's environment.
"""

from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription

ARGUMENTS = {
    "bundle": ("dist/policy", "bundle directory made by `vla-export bundle`"),
    "backend": ("auto", "auto | onnxruntime | tensorrt | aoti | torch"),
    "max_image_age_ms": ("500", "apply the fail-safe when the newest image (or joint state) is older than this"),
    "rate_hz": ("0.0", "act at this rate on the newest inputs; 0 = one action per image (of the first camera)"),
    "instruction": ("Navigate around obstacles to track the target cup", "instruction until one arrives on a topic"),
    "image_reliability": ("best_effort", "image subscription QoS: best_effort | reliable"),
    "output_type": ("", "empty: the bundle's | geometry_msgs/msg/Twist | std_msgs/msg/Float64MultiArray | "
                        "trajectory_msgs/msg/JointTrajectory"),
    "action_topic": ("", "empty: cmd_vel / joint_commands / joint_trajectory by output type"),
    "fail_safe": ("", "empty: the bundle's (zero for Twist, hold for joints) | zero | hold"),
    "joint_names": ("", "comma-separated joint names in action order (empty: the bundle's)"),
    "state_joint_names": ("", "comma-separated joints that fill observation.state (empty: the bundle's)"),
    "time_from_start_ms": ("0", "JointTrajectory point time (0: the bundle's, else 100 ms)"),
    "image": ("image", "camera topic of a one-camera bundle (sensor_msgs/Image)"),
    "instruction_topic": ("instruction", "instruction topic (std_msgs/String)"),
    "cmd_vel": ("cmd_vel", "Twist output topic (geometry_msgs/Twist)"),
    "remap": ("", "more remappings, space-separated FROM:=TO (per-camera images/<cam>, joint_states, joint outputs)"),
}
PARAMETERS = ("bundle", "backend", "max_image_age_ms", "rate_hz", "instruction", "image_reliability", "output_type",
              "action_topic", "fail_safe", "joint_names", "state_joint_names", "time_from_start_ms")
REMAPS = {"image": "image", "instruction": "instruction_topic", "cmd_vel": "cmd_vel"}


def _node(context):
    cmd = ["vla-policy-node", "--ros-args"]
    for name in PARAMETERS:
        value = LaunchConfiguration(name).perform(context)
        if value != "":  # empty: leave it to the node's default (the bundle's declaration)
            cmd += ["-p", f"{name}:={value}"]
    for topic, argument in REMAPS.items():
        cmd += ["-r", f"{topic}:={LaunchConfiguration(argument).perform(context)}"]
    for rule in LaunchConfiguration("remap").perform(context).split():
        cmd += ["-r", rule]
    return [ExecuteProcess(cmd=cmd, name="vla_policy", output="screen", sigterm_timeout="5")]


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in ARGUMENTS.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=_node)])
