import Foundation
import HeraldCore
import HeraldStore

// Scheduled jobs (issue 11): the organisation's jobs, their run history, and a run asked for now.
extension HeraldService {
    func listJobs(_ input: Operations.ListJobs.Input) async throws -> Operations.ListJobs.Output {
        let jobs = try await tenant { tx, _ in try await tx.jobs() }
        return .ok(.init(body: .json(.init(items: jobs.map(Components.Schemas.Job.init)))))
    }

    func getJob(_ input: Operations.GetJob.Input) async throws -> Operations.GetJob.Output {
        let id = try id(input.path.jobId, "job")
        let job = try await tenant { tx, _ in try await tx.job(id) }
        return .ok(.init(body: .json(.init(job))))
    }

    func listJobRuns(_ input: Operations.ListJobRuns.Input) async throws -> Operations.ListJobRuns.Output {
        let id = try id(input.path.jobId, "job")
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let runs = try await tenant { tx, _ in try await tx.jobRuns(of: id, limit: limit, after: cursor) }
        return .ok(.init(body: .json(.init(items: runs.items.map(Components.Schemas.JobRun.init), nextCursor: runs.next?.encoded))))
    }

    func runJob(_ input: Operations.RunJob.Input) async throws -> Operations.RunJob.Output {
        let id = try id(input.path.jobId, "job")
        let job = try await tenant { tx, _ in
            let job = try await tx.requestJobRun(id)
            try await tx.audit(action: "job.run", targetType: "job", targetID: id.lowercased, before: nil, after: nil)
            return job
        }
        return .accepted(.init(body: .json(.init(job))))
    }
}

extension Components.Schemas.Job {
    init(_ job: Job) {
        self.init(
            id: job.id.lowercased, name: mapped(job.name), description: job.name.summary, cron: job.cron,
            intervalSeconds: job.intervalSeconds, timeZone: job.timeZone, paused: job.paused,
            status: mapped(job.status), nextRunAt: job.nextRunAt, runRequestedAt: job.runRequestedAt,
            lastRun: job.lastRun.map(Components.Schemas.JobRun.init))
    }
}

extension Components.Schemas.JobRun {
    init(_ run: HeraldStore.JobRun) {
        self.init(
            id: run.id.lowercased, trigger: mapped(run.trigger), scheduledFor: run.scheduledFor,
            attempt: run.attempt, status: mapped(run.status), startedAt: run.startedAt,
            finishedAt: run.finishedAt, durationMs: run.durationMilliseconds, counts: .init(additionalProperties: run.counts),
            error: run.error)
    }
}
