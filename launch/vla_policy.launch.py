"""Launch the vla_policy node: `ros2 launch launch/vla_policy.launch.py bundle:=/opt/policy image:=/camera/image_raw`.

Runs the `vla-policy-node` entry point (pip install 'vla-export[ros]') as a process, so it needs only the `launch`
package, not a colcon workspace. On Ctrl-C launch sends SIGINT and the node publishes one zero Twist before exiting.
Untested here: the `launch` package is not in this project's environment.
"""

from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription

ARGUMENTS = {
    "bundle": ("dist/policy", "bundle directory made by `vla-export bundle`"),
    "backend": ("auto", "auto | onnxruntime | tensorrt | aoti | torch"),
    "max_image_age_ms": ("500", "publish a zero Twist when the newest image is older than this"),
    "rate_hz": ("0.0", "act at this rate on the newest image; 0 = one action per image"),
    "instruction": ("Navigate around obstacles to track the target cup", "instruction until one arrives on a topic"),
    "image_reliability": ("best_effort", "image subscription QoS: best_effort | reliable"),
    "image": ("image", "camera topic (sensor_msgs/Image)"),
    "instruction_topic": ("instruction", "instruction topic (std_msgs/String)"),
    "cmd_vel": ("cmd_vel", "output topic (geometry_msgs/Twist)"),
}
PARAMETERS = ("bundle", "backend", "max_image_age_ms", "rate_hz", "instruction", "image_reliability")


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in ARGUMENTS.items()]
    cmd = ["vla-policy-node", "--ros-args"]
    for name in PARAMETERS:
        cmd += ["-p", [f"{name}:=", LaunchConfiguration(name)]]
    cmd += ["-r", ["image:=", LaunchConfiguration("image")],
            "-r", ["instruction:=", LaunchConfiguration("instruction_topic")],
            "-r", ["cmd_vel:=", LaunchConfiguration("cmd_vel")]]
    return LaunchDescription([*declared, ExecuteProcess(cmd=cmd, name="vla_policy", output="screen",
                                                        sigterm_timeout="5")])
