"""What a grant costs each node, shown by ``fedomop permit review`` before a permit is signed:
a DP-SGD model's planned accounting and pooled mode's per-node charge for several roster sizes.

Apart from the permit commands so a reviewer's formula lives in one place; the privacy
machinery is imported inside each function (``fedomop --help`` starts without it).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()

POOLED_PREVIEW_NODES = (3, 8, 20, 50)


def print_dp_sgd_cost(spec, delta: float) -> None:
    """A DP-SGD model's whole cost on each node, from the study alone: its planned training
    steps and noisy counts in one RDP accountant (``DpSgdSpec.planned_history``). With a stated
    noise multiplier, the epsilon its grant's cost must cover; without one, the noise multiplier
    a node fixes for a few grants (``privacy.dpsgd.planned_noise_multiplier``). Nothing for
    other kinds."""
    if spec.kind != "dp_sgd":
        return
    from privacy.dpsgd import accountant_epsilon, planned_noise_multiplier

    _, rate, steps = spec.training(spec.noise_multiplier or 1.0).accountant_step()
    plan = (
        f"[bold]{spec.id}[/bold] (dp_sgd): {spec.rounds} rounds of {steps} steps at sample rate "
        f"{rate:g}, plus noisy counts (rho {spec.counts_rho({'phase': 'train'}):g} per round, "
        f"{spec.evaluation_rho:g} for the evaluation)"
    )
    if spec.noise_multiplier is not None:
        epsilon = accountant_epsilon(spec.planned_history(spec.noise_multiplier), delta)
        console.print(
            f"{plan} at noise multiplier {spec.noise_multiplier:g}: epsilon {epsilon:.4g} at "
            f"delta {delta:g} on each node, one RDP accountant; the grant's cost must be at "
            "least this",
            soft_wrap=True,
        )
        return
    fixed = []
    for epsilon in (1.0, 8.0):
        try:
            sigma = planned_noise_multiplier(spec.planned_history, epsilon, delta)
            fixed.append(f"{sigma:.4g} for a grant of epsilon {epsilon:g}")
        except ValueError:
            fixed.append(f"none fits a grant of epsilon {epsilon:g}")
    console.print(
        f"{plan}: each node fixes its noise multiplier from its grant at delta {delta:g}, the "
        f"smallest whose planned rounds fit it: {'; '.join(fixed)}",
        soft_wrap=True,
    )


def print_pooled_cost(spec, rho: float, min_honest: int, delta: float) -> None:
    """Pooled mode's formula and the rho each node books, for several numbers of nodes n
    (nothing for an analysis not released in pooled mode).

    Each node's share has variance sigma^2 / h (sigma^2 = rows / (2 rho), h the policy's honest
    nodes); h honest shares carry the grant's noise, so a node books about rho for any n.
    """
    from privacy.accounting import rho_to_epsilon
    from privacy.secagg import SecAggError, pooled_charge
    from studies.analyses import REGISTRY
    from studies.analyses.pooled import grid
    from studies.analyses.pooled_glm import guard_layout
    from studies.analyses.pooled_survival import layout
    from studies.analysis import release_profile

    profile = release_profile(REGISTRY[spec.kind](), spec)
    if not profile.pooled:
        return
    dimensions = {"pooled_counts": grid, "pooled_glm": guard_layout, "pooled_survival": layout}
    rows, dimension = profile.rows_per_person or 1, dimensions[spec.kind](spec).height
    guard_sum = (
        "its guard sum only, before any score or information is summed; the Newton sums are "
        "exact and charge nothing; "
        if spec.kind == "pooled_glm"
        else ""
    )
    console.print(
        f"[bold]{spec.id}[/bold] (pooled, gaussian grant rho {rho:.4g}, {guard_sum}"
        f"{rows} rows/person): "
        f"each node adds discrete Gaussian noise of variance sigma^2/h, sigma^2 = rows/(2 rho) "
        f"= {rows / (2 * rho):.4g}, h = {min_honest} honest nodes assumed (each node policy's "
        "min_honest_nodes, itself included); the total over n nodes carries variance "
        "n sigma^2/h >= sigma^2; each node books the zCDP of h summed shares (Kairouz, Liu & "
        "Steinke 2021), the same for any n:",
        soft_wrap=True,
    )
    threshold, colluders = getattr(spec, "threshold", None), getattr(spec, "colluders", None)
    console.print(
        f"dropouts: the sum completes with at least t = {threshold or 'n (every node)'} masked "
        "vectors (n - t nodes may drop after sharing their seeds); colluders tolerated: "
        f"{colluders if colluders is not None else 'as each node policy fears'} (h = n - c, "
        "never more than a node's min_honest_nodes); a node refuses t unless t > n/2, t >= h "
        "and 2t > 2n - h",
        soft_wrap=True,
    )
    table = Table()
    for column in ("nodes n", "rho booked per node", "epsilon per node", "total noise sd"):
        table.add_column(column, justify="right")
    for n in POOLED_PREVIEW_NODES:
        try:
            charge = pooled_charge(rho, rows, dimension, n, min_honest)
        except SecAggError as err:  # shares too small for the bound: every node refuses
            table.add_row(str(n), f"refused: {err}", "", "")
            continue
        epsilon = rho_to_epsilon(charge.rho_booked, delta)
        table.add_row(
            str(n), f"{charge.rho_booked:.6g}", f"{epsilon:.4g}", f"{charge.total_sd:.3g}"
        )
    console.print(table)
