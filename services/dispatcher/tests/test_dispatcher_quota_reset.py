import dataclasses
from datetime import UTC, date, datetime

from sqlalchemy import select

from mensajero_common.models import User, UserPlan, UserQuota
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.quotas import service
from mensajero_dispatcher.quotas.service import reset_monthly_quotas
from mensajero_dispatcher.scheduler import default_jobs, run_job_once


async def _quota(factory, user: User, *, sent: int, last_reset: date) -> None:
    async with factory.session_factory() as session:
        plan_id = await session.scalar(
            select(UserPlan.id).where(UserPlan.code == "free")
        )
        session.add(
            UserQuota(
                user_id=user.id,
                plan_id=plan_id,
                sms_sent_this_month=sent,
                last_reset_date=last_reset,
            )
        )
        await session.commit()


async def _state(factory, user: User) -> tuple[int, date]:
    async with factory.session_factory() as session:
        row = (
            await session.execute(
                select(UserQuota.sms_sent_this_month, UserQuota.last_reset_date).where(
                    UserQuota.user_id == user.id
                )
            )
        ).one()
    return row.sms_sent_this_month, row.last_reset_date


async def _set_sent(factory, user: User, sent: int) -> None:
    async with factory.session_factory() as session:
        quota = await session.scalar(
            select(UserQuota).where(UserQuota.user_id == user.id)
        )
        assert quota is not None
        quota.sms_sent_this_month = sent
        await session.commit()


def _with_reset_day(ctx: DispatcherContext, reset_day: int) -> DispatcherContext:
    settings = ctx.settings.model_copy(update={"QUOTA_RESET_DAY": reset_day})
    return dataclasses.replace(ctx, settings=settings)


async def test_reset_on_reset_day(ctx, factory):
    stale = await factory.user()
    fresh = await factory.user()
    await _quota(factory, stale, sent=40, last_reset=date(2024, 2, 1))
    await _quota(factory, fresh, sent=7, last_reset=date(2024, 3, 1))

    count = await reset_monthly_quotas(ctx, now=datetime(2024, 3, 1, 0, 5, tzinfo=UTC))

    assert count == 1
    assert await _state(factory, stale) == (0, date(2024, 3, 1))
    assert await _state(factory, fresh) == (7, date(2024, 3, 1))


async def test_reset_twice_resets_once(ctx, factory):
    user = await factory.user()
    await _quota(factory, user, sent=50, last_reset=date(2024, 2, 1))
    now = datetime(2024, 3, 1, 8, tzinfo=UTC)

    first = await reset_monthly_quotas(ctx, now=now)
    # A send charged between the two runs must survive the second one.
    await _set_sent(factory, user, 3)
    second = await reset_monthly_quotas(ctx, now=now)

    assert first == 1
    assert second == 0
    assert await _state(factory, user) == (3, date(2024, 3, 1))


async def test_reset_waits_for_boundary(ctx, factory):
    user = await factory.user()
    await _quota(factory, user, sent=40, last_reset=date(2024, 2, 1))

    count = await reset_monthly_quotas(
        ctx, now=datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)
    )

    assert count == 0
    assert await _state(factory, user) == (40, date(2024, 2, 1))


async def test_reset_boundary_is_utc_midnight(ctx, factory):
    user = await factory.user()
    await _quota(factory, user, sent=40, last_reset=date(2024, 2, 1))
    # 19:00 on Feb 29 in Mexico City (UTC-6) is already 01:00 on Mar 1 in UTC.
    mexico_city = datetime.fromisoformat("2024-02-29T19:00:00-06:00")

    count = await reset_monthly_quotas(ctx, now=mexico_city)

    assert count == 1
    assert await _state(factory, user) == (0, date(2024, 3, 1))


async def test_reset_on_configured_day(ctx, factory):
    user = await factory.user()
    await _quota(factory, user, sent=40, last_reset=date(2024, 2, 15))
    on_fifteenth = _with_reset_day(ctx, 15)

    before = await reset_monthly_quotas(
        on_fifteenth, now=datetime(2024, 3, 14, 23, tzinfo=UTC)
    )
    after = await reset_monthly_quotas(
        on_fifteenth, now=datetime(2024, 3, 15, 0, 1, tzinfo=UTC)
    )

    assert before == 0
    assert after == 1
    assert await _state(factory, user) == (0, date(2024, 3, 15))


async def test_reset_catches_up_missed_months(ctx, factory):
    user = await factory.user()
    await _quota(factory, user, sent=12, last_reset=date(2023, 12, 1))

    count = await reset_monthly_quotas(ctx, now=datetime(2024, 3, 20, tzinfo=UTC))

    assert count == 1
    assert await _state(factory, user) == (0, date(2024, 3, 20))


async def test_reset_in_batches(ctx, factory, monkeypatch):
    monkeypatch.setattr(service, "RESET_BATCH_SIZE", 2)
    users = [await factory.user() for _ in range(5)]
    for user in users:
        await _quota(factory, user, sent=9, last_reset=date(2024, 1, 1))

    count = await reset_monthly_quotas(ctx, now=datetime(2024, 2, 1, 1, tzinfo=UTC))

    assert count == 5
    for user in users:
        assert await _state(factory, user) == (0, date(2024, 2, 1))


async def test_reset_job_is_scheduled(ctx):
    jobs = {job.name: job for job in default_jobs(ctx)}

    job = jobs["quota.reset_monthly"]
    assert job.interval_s == ctx.settings.QUOTA_RESET_CHECK_INTERVAL_S
    assert job.run is reset_monthly_quotas


async def test_reset_job_runs_from_scheduler(ctx, factory):
    user = await factory.user()
    await _quota(factory, user, sent=33, last_reset=date(2020, 1, 1))
    job = next(job for job in default_jobs(ctx) if job.name == "quota.reset_monthly")

    await run_job_once(ctx, job)

    assert await _state(factory, user) == (0, datetime.now(UTC).date())
