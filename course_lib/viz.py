"""Pictures for the course, one module per chapter (``course_lib.viz_<chapter stem>``), on the
shared :mod:`course_lib.figures`. Every name is importable from here too, as before.
"""

from course_lib.figures import CourseFigure, rank_color  # noqa: F401
from course_lib.figures import bare as _bare  # noqa: F401 - its name before the split
from course_lib.viz_collectives import (  # noqa: F401
    collective_explorer,
    draw_rank_rows,
    plot_alpha_beta,
    plot_collective,
    plot_rounds,
    plot_timing,
    show_collective,
)
from course_lib.viz_moe import (  # noqa: F401
    plot_balance_training,
    plot_drop_curves,
    plot_expert_buffers,
    plot_expert_load,
    plot_routing,
    routing_explorer,
)
from course_lib.viz_parallel_3d import (  # noqa: F401
    PLAN_PART_COLORS,
    draw_rank_grid,
    plan_calculator,
    plot_plan_memory,
)
from course_lib.viz_pipeline_parallel import (  # noqa: F401
    PIPELINE_COLORS,
    pipeline_explorer,
    plot_measured_pipeline,
    plot_pipeline,
    plot_schedule,
)
from course_lib.viz_ring_allreduce import (  # noqa: F401
    plot_bucket_timelines,
    plot_bytes_per_rank,
    plot_ring_step,
    plot_ring_steps,
    ring_explorer,
)
from course_lib.viz_tensor_parallel import (  # noqa: F401
    plot_all_reduce_times,
    plot_saved_activations,
    plot_sequence_parallel_holdings,
    plot_tp_layout,
)
from course_lib.viz_zero import (  # noqa: F401
    ZERO_KIND_COLORS,
    ZERO_KIND_LABELS,
    ZERO_STAGE_NAMES,
    plot_zero_calculator,
    plot_zero_holdings,
    plot_zero_memory,
    plot_zero_traffic,
    zero_memory_calculator,
)
