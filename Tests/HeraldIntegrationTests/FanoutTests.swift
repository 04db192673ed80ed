import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldDelivery
@testable import HeraldStore

/// Chunked fan-out (issue 12, migration 0021): an audience above the synchronous limit is
/// accepted at once and its recipients are written a chunk per transaction, against the real
/// database. The limits here are small so that 27 users make four chunks.
@Suite("Chunked fan-out")
struct FanoutTests {
    static let settings = FanoutSettings(synchronousLimit: 10, chunkSize: 8)

    /// An organisation with its owner, its member and 25 more users (27), and the test catalogue.
    func organisation() async throws -> (TestOrganisation, [UUID]) {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await org.store { tx in
            for index in 0..<25 {
                _ = try await tx.createUser(NewUser(email: "user\(index)@\(org.slug).example", displayName: "User \(index)"))
            }
        }
        let users = try await org.store { tx in
            try await tx.query("SELECT id FROM users WHERE organisation_id = \(org.id) ORDER BY id").map { try $0.decode(UUID.self) }
        }
        return (org, users)
    }

    /// Every user of an event's explanation, read page by page (`pages` a page), in its order.
    func explained(
        _ client: some TestClientProtocol, _ org: TestOrganisation, event: String, pages: Int
    ) async throws -> [Components.Schemas.ExplainedUser] {
        var items: [Components.Schemas.ExplainedUser] = []
        var cursor: String?
        repeat {
            let page = try await client.send(
                .get, "/v1/events/\(event)/explain?limit=\(pages)" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken)
            try #require(page.status == .ok, "\(page.text)")
            let explanation = try page.decoded(Components.Schemas.Explanation.self)
            items += explanation.items
            cursor = explanation.nextCursor
        } while cursor != nil
        return items
    }

    func everyone(_ type: String = "TASK_ASSIGNED") -> EventRequest {
        EventRequest(
            typeKey: type, audience: Audience(everyone: true), payload: .object(["title": .string("All hands"), "isq": .number(25)]))
    }

    /// Rows of `table` the event has, and how many distinct users they cover.
    func rows(_ org: TestOrganisation, _ table: String, event: UUID) async throws -> (rows: Int, users: Int) {
        try await org.store { tx in
            let row = try await tx.query(
                "SELECT count(*)::int, count(DISTINCT user_id)::int FROM \(unescaped: table) WHERE organisation_id = \(org.id) AND event_id = \(event)"
            ).first!
            return try row.decode((Int, Int).self)
        }
    }

    func claim(_ org: TestOrganisation, worker: String) async throws -> ClaimedFanout? {
        try await TestEnvironment.shared.database.claimFanouts(worker: worker, limit: 1, leaseSeconds: 60, organisation: org.id).first
    }

    func chunk(_ org: TestOrganisation, _ claim: ClaimedFanout, worker: String, now: Date = Date()) async throws -> FanoutStep {
        try await org.store { tx in
            try await tx.expandChunk(claim, worker: worker, size: Self.settings.chunkSize, now: now, leaseSeconds: 60)
        }
    }

    @Test("a chunk's id arrays, written in one pass (UUIDArray), reach PostgreSQL as PostgresNIO's own encoding does: empty, one, many")
    func idArraysAsPostgresNIOWritesThem() async throws {
        let env = try await TestEnvironment.shared
        for ids in [[], [UUID()], (0..<1_000).map { _ in UUID() }] {
            let rows = try await env.appClient.query(
                "SELECT \(UUIDArray(ids))::uuid[] = \(ids)::uuid[], cardinality(\(UUIDArray(ids))::uuid[]), (\(UUIDArray(ids))::uuid[])[1:2]",
                logger: env.logger)
            for try await (same, count, head) in rows.decode((Bool, Int, [UUID]).self) {
                #expect(same, "\(ids.count) ids")
                #expect(count == ids.count)
                #expect(head == Array(ids.prefix(2)))
            }
        }
    }

    @Test(
        "a thousand recipients decided alike are one run of the trace; explain pages them in order, finds one by id, and erasure takes one out"
    )
    func traceRuns() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let env = try await TestEnvironment.shared
        // 2 400 users; one switched in-app off (a decision of their own), one excluded (not targeted).
        let users = try await org.store { tx in
            try await tx.query(
                """
                INSERT INTO users (organisation_id, email, display_name)
                SELECT \(org.id), 'reader' || g || '@' || \(org.slug) || '.example', 'Reader ' || g FROM generate_series(1, 2400) g
                """)
            return try await tx.query("SELECT id FROM users WHERE organisation_id = \(org.id) ORDER BY id").map { try $0.decode(UUID.self) }
        }
        let activity = try await org.store { tx in
            try await tx.query("SELECT id FROM categories WHERE organisation_id = \(org.id) AND key = 'activity'")[0].decode(UUID.self)
        }
        let (muted, excluded) = (users[700], users[1500])
        try await org.store { tx in
            try await tx.replacePreferences(
                ofUser: muted,
                with: [PreferenceCell(categoryID: activity, channel: .inApp, setting: PreferenceSetting(enabled: false, frequency: .none))])
        }
        let app = try env.application(configure: {
            $0.fanoutSyncLimit = 10_000; $0.fanoutChunkSize = 1_300
        })
        try await app.test(.router) { client in
            let body =
                #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true, "exclude_user_ids": ["\#(excluded.lowercased)"]}, "payload": {"title": "All hands"}}"#
            let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body)
            #expect(sent.status == .accepted, "\(sent.text)")
            let eventID = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            // One run for everyone decided alike; own rows for the muted and the excluded users.
            let (own, runs, inRuns) = try await org.store { tx in
                let own = try await tx.query(
                    "SELECT user_id FROM event_recipients WHERE organisation_id = \(org.id) AND event_id = \(eventID)::uuid ORDER BY user_id"
                ).map { try $0.decode(UUID.self) }
                let runs = try await tx.query(
                    "SELECT count(*)::int, coalesce(sum(cardinality(user_ids)), 0)::int FROM event_recipient_runs WHERE organisation_id = \(org.id) AND event_id = \(eventID)::uuid"
                )[0].decode((Int, Int).self)
                return (own, runs.0, runs.1)
            }
            #expect(Set(own) == [muted, excluded] && runs == 1 && inRuns == users.count - 2, "\(own) \(runs) \(inRuns)")
            // Explain pages every user once, in order; each in-app id is the user's own row.
            let rows = try await org.store { tx in
                Dictionary(
                    uniqueKeysWithValues: try await tx.query(
                        "SELECT user_id, id FROM notifications WHERE organisation_id = \(org.id) AND event_id = \(eventID)::uuid"
                    ).map { try $0.decode((UUID, UUID).self) })
            }
            var seen: [UUID] = []
            for item in try await explained(client, org, event: eventID, pages: 200) {
                let user = try #require(UUID(uuidString: item.userId))
                seen.append(user)
                let inApp = item.channels.first { $0.channel == .inApp }
                if user == muted {
                    #expect(inApp?.reason == "CHANNEL_DISABLED")
                } else if user == excluded {
                    #expect(item.reason == "EXCLUDED")
                } else {
                    #expect(inApp?.notificationId == rows[user]?.lowercased, "\(user)")
                }
            }
            #expect(seen == users)
            // One user by id, in the run and not.
            for user in [users[1200], muted] {
                let one = try await client.send(.get, "/v1/events/\(eventID)/explain?user_id=\(user.lowercased)", token: org.ownerToken)
                try #require(one.status == .ok, "\(one.text)")
                #expect(try one.decoded(Components.Schemas.Explanation.self).items.map(\.userId) == [user.lowercased], "\(one.text)")
            }
            // Erased: out of the run, and the next user's rows are still theirs.
            let erased = users[1200]
            #expect(try await client.send(.delete, "/v1/users/\(erased)", token: org.ownerToken).status == .noContent)
            let gone = try await client.send(.get, "/v1/events/\(eventID)/explain?user_id=\(erased.lowercased)", token: org.ownerToken)
            #expect(gone.isProblem(.notFound), "\(gone.text)")
            let next = try await client.send(.get, "/v1/events/\(eventID)/explain?user_id=\(users[1201].lowercased)", token: org.ownerToken)
            let channels = try #require(try next.decoded(Components.Schemas.Explanation.self).items.first).channels
            #expect(channels.first { $0.channel == .inApp }?.notificationId == rows[users[1201]]?.lowercased)
            let left = try await org.store { tx in
                try await tx.query(
                    "SELECT cardinality(user_ids), length(records) / 16, \(erased) = ANY(user_ids) FROM event_recipient_runs WHERE organisation_id = \(org.id) AND event_id = \(eventID)::uuid"
                )[0].decode((Int, Int, Bool).self)
            }
            #expect(left.0 == users.count - 3 && left.1 == left.0 && !left.2, "\(left)")
            // Two erasures at once, the run's first user and its last: each takes out its own.
            async let first = client.send(.delete, "/v1/users/\(users[0])", token: org.ownerToken)
            async let last = client.send(.delete, "/v1/users/\(users[users.count - 1])", token: org.ownerToken)
            let (firstGone, lastGone) = try await (first, last)
            #expect(firstGone.status == .noContent && lastGone.status == .noContent, "\(firstGone.text) \(lastGone.text)")
            let shrunk = try await org.store { tx in
                try await tx.query(
                    "SELECT first_user, last_user, size, cardinality(user_ids), length(records) / 16 FROM event_recipient_runs WHERE organisation_id = \(org.id) AND event_id = \(eventID)::uuid"
                )[0].decode((UUID, UUID, Int, Int, Int).self)
            }
            #expect(shrunk.0 == users[1] && shrunk.1 == users[users.count - 2], "\(shrunk)")
            #expect(shrunk.2 == users.count - 5 && shrunk.3 == shrunk.2 && shrunk.4 == shrunk.2, "\(shrunk)")
            for user in [users[1], users[users.count - 2]] {
                let one = try await client.send(.get, "/v1/events/\(eventID)/explain?user_id=\(user.lowercased)", token: org.ownerToken)
                let item = try #require(try one.decoded(Components.Schemas.Explanation.self).items.first)
                #expect(item.channels.first { $0.channel == .inApp }?.notificationId == rows[user]?.lowercased)
            }
        }
        // Written in chunks of 1 300: a run per chunk, and a page that crosses from one to the next.
        let chunked = try env.application(configure: {
            $0.fanoutSyncLimit = 1_000; $0.fanoutChunkSize = 1_300
        })
        try await chunked.test(.router) { client in
            let body = #"{"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "payload": {"title": "Again"}}"#
            let eventID = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body).decoded(
                Components.Schemas.EventAccepted.self
            ).eventId
            let name = "fanout-runs-\(UUID().uuidString.prefix(6))"
            let runner = WorkRunner(
                configuration: WorkRunnerConfiguration(name: name), queue: FanoutQueue(database: env.database, organisation: org.id),
                handler: FanoutHandler(database: env.database, worker: name, chunkSize: 1_300),
                bus: NotificationBus(client: env.appClient, logger: env.logger), logger: env.logger)
            #expect(try await runner.runDue() == 1)
            let runs = try await org.store { tx in
                try await tx.query(
                    "SELECT count(*)::int FROM event_recipient_runs WHERE organisation_id = \(org.id) AND event_id = \(eventID)::uuid"
                )[0].decode(Int.self)
            }
            #expect(runs == 2)
            let seen = try await explained(client, org, event: eventID, pages: 170).compactMap { UUID(uuidString: $0.userId) }
            #expect(seen == users.filter { ![users[0], users[1200], users[users.count - 1]].contains($0) })
        }
    }

    @Test("a large audience is answered at once, written in chunks by the runner, and ends as a synchronous notify would")
    func chunkedThroughTheAPI() async throws {
        let (org, users) = try await organisation()
        let env = try await TestEnvironment.shared
        let app = try env.application(configure: {
            $0.fanoutSyncLimit = Self.settings.synchronousLimit
            $0.fanoutChunkSize = Self.settings.chunkSize
        })
        try await app.test(.router) { client in
            let body = #"{"type": "ISQ_CRITICAL", "audience": {"everyone": true}, "payload": {"isq": 25, "threshold": 55}}"#
            let accepted = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body)
            #expect(accepted.status == .accepted, "\(accepted.text)")
            let answer = try accepted.decoded(Components.Schemas.EventAccepted.self)
            #expect(answer.fanout?.state == .expanding && answer.fanout?.done == 0)
            #expect(answer.counts.considered == 0)
            let id = try #require(UUID(uuidString: answer.eventId))
            #expect(try await rows(org, "notifications", event: id).rows == 0)

            let name = "fanout-test-\(UUID().uuidString.prefix(6))"
            let runner = WorkRunner(
                configuration: WorkRunnerConfiguration(name: name), queue: FanoutQueue(database: env.database, organisation: org.id),
                handler: FanoutHandler(database: env.database, worker: name, chunkSize: Self.settings.chunkSize),
                bus: NotificationBus(client: env.appClient, logger: env.logger), logger: env.logger)
            #expect(try await runner.runDue() == 1)

            let event = try await client.send(.get, "/v1/events/\(answer.eventId)", token: org.ownerToken).decoded(
                Components.Schemas.Event.self)
            #expect(event.fanout?.state == .done)
            #expect(event.fanout?.done == users.count && event.fanout?.expected == users.count)
            #expect(event.fanout?.finishedAt != nil)
            #expect(event.counts.considered == users.count && event.counts.inApp == users.count && event.counts.immediate == users.count)
            // Every user exactly once, in every table.
            #expect(try await rows(org, "notifications", event: id) == (users.count, users.count))
            #expect(try await rows(org, "deliveries", event: id) == (users.count, users.count))
            #expect(try await rows(org, "event_recipients", event: id) == (users.count, users.count))

            // The same body within the limit is written by notify itself, with the same counts.
            let small = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type": "ISQ_CRITICAL", "audience": {"user_ids": ["\#(org.memberID.lowercased)"]}, "payload": {"isq": 25}}"#)
            let smallAnswer = try small.decoded(Components.Schemas.EventAccepted.self)
            #expect(smallAnswer.fanout == nil && smallAnswer.counts.inApp == 1)
            let direct = try await org.notify(everyone("ISQ_CRITICAL"))
            #expect(direct.event.fanout == nil)
            #expect(try convert(direct.event.counts) == event.counts)

            // Explain reads the chunked event's trace like any other.
            let explained = try await client.send(.get, "/v1/events/\(answer.eventId)/explain?limit=100", token: org.ownerToken)
            #expect(try explained.decoded(Components.Schemas.Explanation.self).items.count == users.count)
        }
    }

    @Test("a chunked fan-out holds the emails of recipients in their quiet hours, and only theirs, in every chunk")
    func quietHoursInChunks() async throws {
        let (org, users) = try await organisation()
        let activity = try await org.store { tx in
            try await tx.query("SELECT id FROM categories WHERE organisation_id = \(org.id) AND key = 'activity'")[0].decode(UUID.self)
        }
        try await org.deliveryType("NIGHT_NOTE", category: activity, channels: [.inApp, .email])
        // Five users, one in each chunk's range and more, sleep from 22:00 to 07:00 UTC.
        let sleepers = Set(stride(from: 0, to: users.count, by: 6).map { users[$0] })
        let nights = try #require(QuietHours(start: "22:00", end: "07:00"))
        try await org.store { tx in
            for id in sleepers { _ = try await tx.updateUser(id, UserChange(timezone: .some("UTC"), quietHours: .some(nights))) }
            for id in users where !sleepers.contains(id) { _ = try await tx.updateUser(id, UserChange(timezone: .some("UTC"))) }
        }
        // Due at 23:00 UTC tomorrow: held until 07:00 the day after.
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .gmt
        let tomorrow = try #require(calendar.date(byAdding: .day, value: 1, to: Date()))
        let due = try #require(calendar.date(bySettingHour: 23, minute: 0, second: 0, of: tomorrow))
        let morning = due.addingTimeInterval(8 * 3600)
        var request = everyone("NIGHT_NOTE")
        request.deliverAt = due
        let id = try await org.store { tx in try await tx.send(request, now: Date(), fanout: Self.settings).id }
        let worker = "fanout-quiet-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: worker))
        var step = try await chunk(org, lease, worker: worker)
        while case .expanded(_, false) = step { step = try await chunk(org, lease, worker: worker) }
        #expect(step == .expanded(done: users.count, finished: true))

        let dueTimes = try await org.store { tx in
            try await tx.query(
                "SELECT user_id, next_attempt_at FROM deliveries WHERE organisation_id = \(org.id) AND event_id = \(id)"
            ).map { try $0.decode((UUID, Date).self) }
        }
        #expect(dueTimes.count == users.count)
        for (user, at) in dueTimes {
            let expected = sleepers.contains(user) ? morning : due
            #expect(abs(at.timeIntervalSince(expected)) < 1, "\(user): \(at) against \(expected)")
        }
        // Their bell rows are not held.
        #expect(try await rows(org, "notifications", event: id) == (users.count, users.count))
    }

    @Test("cancelling half-way stops the chunks not yet written and cancels what the written ones queued")
    func cancelledHalfWay() async throws {
        let (org, users) = try await organisation()
        let id = try await org.store { tx in try await tx.send(everyone("ISQ_CRITICAL"), now: Date(), fanout: Self.settings).id }
        let worker = "fanout-cancel-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: worker))
        #expect(try await chunk(org, lease, worker: worker) == .expanded(done: 8, finished: false))
        #expect(try await chunk(org, lease, worker: worker) == .expanded(done: 16, finished: false))

        let cancellation = try #require(try await org.store { tx in try await tx.cancelEvent(id, now: Date()) })
        #expect(cancellation.deliveries == 16)
        #expect(try await chunk(org, lease, worker: worker) == .cancelled(done: 16))

        let event = try await org.store { tx in try await tx.event(id) }
        #expect(event.fanout?.state == .cancelled && event.fanout?.done == 16)
        #expect(event.counts.considered == 16)
        #expect(try await rows(org, "notifications", event: id) == (16, 16))
        #expect(try await rows(org, "event_recipients", event: id) == (16, 16))
        let pending = try await org.store { tx in
            try await tx.query(
                "SELECT count(*)::int FROM deliveries WHERE organisation_id = \(org.id) AND event_id = \(id) AND status <> 'CANCELLED'"
            ).first!.decode(Int.self)
        }
        #expect(pending == 0)
        // Nothing is left to claim, and users after the cursor were never written.
        #expect(try await claim(org, worker: worker) == nil)
        #expect(users.count == 27)
        // Explain, asked about a user the trace does not hold, says the fan-out stopped first.
        let owner = try await org.store { tx in try await tx.user(org.ownerID) }
        #expect(HeraldService.untraced(owner, fanout: event.fanout).reason == "NOT_WRITTEN")
        #expect(HeraldService.untraced(owner, fanout: nil).reason == "NOT_IN_AUDIENCE")
    }

    @Test("the runner counts the audience beside the chunks' writes; a lease that pauses after its first chunk leaves the total shown")
    func countedBesideTheFirstChunk() async throws {
        let (org, users) = try await organisation()
        let id = try await org.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        let worker = "fanout-count-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: worker))
        let env = try await TestEnvironment.shared
        // No time budget: the lease writes one chunk, plans the next beside it, and pauses.
        let handler = FanoutHandler(database: env.database, worker: worker, chunkSize: Self.settings.chunkSize, budget: .zero)
        guard case .done(.paused(let done)) = try await handler.handle(lease, logger: env.logger) else {
            Issue.record("the lease did not pause after its first chunk")
            return
        }
        #expect(done == Self.settings.chunkSize)
        let progress = try await org.store { tx in try await tx.event(id) }.fanout
        #expect(progress?.done == Self.settings.chunkSize && progress?.expected == users.count)
    }

    @Test("a chunk planned ahead is written only where the cursor is, and a cancel between its planning and its write wins")
    func plannedAhead() async throws {
        let (org, users) = try await organisation()
        let id = try await org.store { tx in try await tx.send(everyone("ISQ_CRITICAL"), now: Date(), fanout: Self.settings).id }
        let worker = "fanout-ahead-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: worker))
        func prepare(_ start: ChunkStart) async throws -> PreparedChunk {
            try #require(
                try await org.store { tx in
                    try await tx.prepareChunk(lease, worker: worker, from: start, size: Self.settings.chunkSize, now: Date())
                })
        }
        func write(_ chunk: PreparedChunk) async throws -> FanoutStep {
            try await org.store { tx in try await tx.writeChunk(lease, chunk, worker: worker, leaseSeconds: 60) }
        }
        func expected() async throws -> Int? { try await org.store { tx in try await tx.event(id) }.fanout?.expected }
        let first = try await prepare(.storedCursor)
        // Counted beside the chunks, the audience goes with the next chunk written.
        var second = try await prepare(.after(try #require(first.last)))
        second.expected = try await org.store { tx in try await tx.countFanoutAudience(lease, worker: worker) }
        #expect(second.expected == users.count)
        #expect(try await org.store { tx in try await tx.countFanoutAudience(lease, worker: "someone-else") } == nil)
        // The second chunk starts after the first, which is not written yet: refused, nothing written.
        #expect(try await write(second) == .leaseLost)
        #expect(try await rows(org, "notifications", event: id) == (0, 0))
        #expect(try await write(first) == .expanded(done: 8, finished: false))
        // The first chunk's write counts nothing under the event's row lock.
        #expect(try await expected() == nil)
        #expect(try await write(second) == .expanded(done: 16, finished: false))
        #expect(try await expected() == users.count)
        // Another instance's worker name is not the lease's.
        #expect(
            try await org.store { tx in
                try await tx.writeChunk(lease, try await prepare(.storedCursor), worker: "someone-else", leaseSeconds: 60)
            }
                == .leaseLost)

        let third = try await prepare(.after(try #require(second.last)))
        _ = try #require(try await org.store { tx in try await tx.cancelEvent(id, now: Date()) })
        #expect(try await write(third) == .cancelled(done: 16))
        #expect(try await rows(org, "notifications", event: id) == (16, 16))
        #expect(try await rows(org, "event_recipients", event: id) == (16, 16))
        // A cancelled event is no longer planned ahead.
        #expect(
            try await org.store { tx in try await tx.prepareChunk(lease, worker: worker, from: .storedCursor, size: 8, now: Date()) } == nil
        )
    }

    @Test("a dry run plans its audience a chunk at a time, with the counts and pages of one plan of the whole audience")
    func dryRunInChunks() async throws {
        let (org, users) = try await organisation()
        let env = try await TestEnvironment.shared
        let app = try env.application(configure: { $0.fanoutChunkSize = Self.settings.chunkSize })
        // The oracle: the planner over the whole audience at once.
        let whole = try await org.store { tx in try await tx.planEvent(everyone("ISQ_CRITICAL"), eventID: UUID(), now: Date()) }
        #expect(whole.plan.traces.count == users.count)
        try await app.test(.router) { client in
            let body = #"{"type": "ISQ_CRITICAL", "audience": {"everyone": true}, "payload": {"title": "All hands", "isq": 25}}"#
            var paged: [String] = []
            var cursor: String?
            var pages: [Components.Schemas.Explanation] = []
            repeat {
                let page = try await client.send(
                    .post, "/v1/events/dry-run?limit=10" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken, json: body)
                #expect(page.status == .ok, "\(page.text)")
                let explanation = try page.decoded(Components.Schemas.Explanation.self)
                pages.append(explanation)
                paged += explanation.items.map(\.userId)
                cursor = explanation.nextCursor
            } while cursor != nil && pages.count < 10
            // 27 users in chunks of 8, pages of 10: every user once, in id order, on three pages.
            #expect(paged == users.map(\.uuidString).map { $0.lowercased() })
            #expect(pages.map(\.items.count) == [10, 10, 7])
            let counts = whole.plan.counts
            let planned: [Int] = [
                counts.considered, counts.targeted, counts.notTargeted, counts.inApp, counts.immediate, counts.digest, counts.skipped,
            ]
            for page in pages {
                let c = try #require(page.counts)
                let shown: [Int] = [c.considered, c.targeted, c.notTargeted, c.inApp, c.immediate, c.digest, c.skipped]
                #expect(shown == planned)
            }
            #expect(counts.considered == users.count && counts.inApp > 0)
            // The audience's names are still checked (by the first chunk).
            let unknown = try await client.send(
                .post, "/v1/events/dry-run", token: org.ownerToken, json: #"{"type": "ISQ_CRITICAL", "audience": {"groups": ["nope"]}}"#)
            #expect(unknown.isProblem(.unprocessableContent), "\(unknown.text)")
        }
    }

    @Test(
        "a chunk written behind the one before writes its rows beside it and records itself after that commit; a failed fence rolls it back whole"
    )
    func writtenBehind() async throws {
        let (org, _) = try await organisation()
        let id = try await org.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        let worker = "fanout-behind-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: worker))
        func prepare(_ start: ChunkStart) async throws -> PreparedChunk {
            try #require(
                try await org.store { tx in
                    try await tx.prepareChunk(lease, worker: worker, from: start, size: Self.settings.chunkSize, now: Date())
                })
        }
        func behind(_ chunk: PreparedChunk) async throws -> FanoutStep? {
            do {
                return try await org.store { tx in try await tx.writeChunkBehind(lease, chunk, worker: worker, leaseSeconds: 60) }
            } catch is ChunkNotWritten {
                return nil
            }
        }
        func written() async throws -> [Int] {
            var counts: [Int] = []
            for table in ["notifications", "deliveries", "event_recipients"] { counts.append(try await rows(org, table, event: id).rows) }
            return counts
        }
        let first = try await prepare(.storedCursor)
        let second = try await prepare(.after(try #require(first.last)))
        // The chunk before is not written: the fence fails after the rows, which roll back with it.
        #expect(try await behind(second) == nil)
        #expect(try await written() == [0, 0, 0])

        // The first chunk's transaction holds the event's row until it is let go.
        let (firstWritten, firstWrittenSignal) = AsyncStream.makeStream(of: Int32.self)
        let (letGo, letGoSignal) = AsyncStream.makeStream(of: Void.self)
        let firstWrite = Task {
            try await org.store { tx in
                let step = try await tx.writeChunk(lease, first, worker: worker, leaseSeconds: 60)
                firstWrittenSignal.yield(try await tx.query("SELECT pg_backend_pid()").first!.decode(Int32.self))
                for await _ in letGo { break }
                return step
            }
        }
        var holder: Int32?
        for await pid in firstWritten {
            holder = pid
            break
        }
        let firstPID = try #require(holder)
        let secondWrite = Task { try await behind(second) }
        // The second chunk's rows are written beside the first's transaction (their reference checks
        // share the event key's lock): what waits for the first is the lock on the event's row.
        var waiting: String?
        for _ in 0..<200 where waiting == nil {
            waiting = try await TestEnvironment.shared.database.query(
                "SELECT query FROM pg_stat_activity WHERE \(firstPID) = ANY(pg_blocking_pids(pid))"
            ).first?.decode(String.self)
            if waiting == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        letGoSignal.yield()
        letGoSignal.finish()
        #expect(waiting?.contains("FOR NO KEY UPDATE OF e") == true, "blocked: \(waiting ?? "nothing")")
        #expect(try await firstWrite.value == .expanded(done: 8, finished: false))
        #expect(try await secondWrite.value == .expanded(done: 16, finished: false))
        let both = try await written()
        #expect(both[0] == 16 && both[2] == 16)

        // Cancelled between its planning and its write: rolled back whole.
        let third = try await prepare(.after(try #require(second.last)))
        let before = try await written()
        _ = try #require(try await org.store { tx in try await tx.cancelEvent(id, now: Date()) })
        #expect(try await behind(third) == nil)
        #expect(try await written() == before)
    }

    @Test("a lease that expires mid-way moves to another instance, which goes on from the cursor: every user once")
    func leaseMovesOn() async throws {
        let (org, users) = try await organisation()
        let id = try await org.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        let first = "fanout-a-\(UUID().uuidString.prefix(6))", second = "fanout-b-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: first))
        #expect(try await chunk(org, lease, worker: first) == .expanded(done: 8, finished: false))
        // The first instance stalls; its lease runs out.
        _ = try await org.store { tx in
            try await tx.query(
                "UPDATE events SET fanout_lease_expires_at = now() - interval '1 second' WHERE organisation_id = \(org.id) AND id = \(id)")
        }
        let taken = try #require(try await claim(org, worker: second))
        #expect(taken.attempt == lease.attempt + 1)
        // The stalled instance wakes up: fenced, it writes nothing.
        #expect(try await chunk(org, lease, worker: first) == .leaseLost)
        #expect(try await chunk(org, taken, worker: second) == .expanded(done: 16, finished: false))
        #expect(try await chunk(org, taken, worker: second) == .expanded(done: 24, finished: false))
        #expect(try await chunk(org, taken, worker: second) == .expanded(done: 27, finished: true))
        #expect(try await rows(org, "notifications", event: id) == (users.count, users.count))
        #expect(try await rows(org, "event_recipients", event: id) == (users.count, users.count))
        #expect(try await chunk(org, taken, worker: second) == .leaseLost)
    }

    @Test("a mark-all-read clicked during a chunked fan-out leaves the chunks written after it unread")
    func markAllDuringFanout() async throws {
        let (org, users) = try await organisation()
        let start = Date().addingTimeInterval(-3600)
        let id = try await org.store { tx in try await tx.send(everyone(), now: start, fanout: Self.settings).id }
        let worker = "fanout-mark-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(org, worker: worker))
        #expect(try await chunk(org, lease, worker: worker, now: start) == .expanded(done: 8, finished: false))
        // Twenty minutes later (past the settling time of "mark all read"), with chunks still to
        // come, the first and the last user mark everything read.
        let click = start.addingTimeInterval(20 * 60)
        let (early, late) = (users[0], users[26])
        try await org.store { tx in
            for user in [early, late] {
                try await tx.markAllRead(
                    of: user, through: TimeOrderedID.upperBound(at: click),
                    settled: TimeOrderedID.upperBound(at: click.addingTimeInterval(-TimeOrderedID.settlingTime)))
            }
        }
        let later = click.addingTimeInterval(60)
        while case .expanded(_, false) = try await chunk(org, lease, worker: worker, now: later) {}
        let (earlyCount, lateCount) = try await org.store { tx in
            (try await tx.unreadCount(of: early, now: Date()).total, try await tx.unreadCount(of: late, now: Date()).total)
        }
        #expect(earlyCount == 0, "the first chunk was written before the click")
        #expect(lateCount == 1, "the last chunk was written after the click")
        #expect(try await rows(org, "notifications", event: id).rows == users.count)
    }

    @Test("unknown audience names are refused before anything is accepted, and chunks stay in their organisation")
    func refusalsAndIsolation() async throws {
        let (org, _) = try await organisation()
        let (other, otherUsers) = try await organisation()
        await #expect(throws: UnknownAudience.self) {
            try await org.store { tx in
                try await tx.send(
                    EventRequest(
                        typeKey: "TASK_ASSIGNED", audience: Audience(groupKeys: ["nobody"], everyone: true), payload: .object([:])),
                    now: Date(), fanout: Self.settings)
            }
        }
        #expect(try await claim(org, worker: "fanout-none") == nil)
        // Another organisation's fan-out is neither claimable under this one nor readable.
        let theirs = try await other.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        #expect(try await claim(org, worker: "fanout-iso") == nil)
        await #expect(throws: StoreError.self) { try await org.store { tx in try await tx.event(theirs) } }
        let worker = "fanout-iso-\(UUID().uuidString.prefix(6))"
        let lease = try #require(try await claim(other, worker: worker))
        // A chunk run in the wrong organisation finds no event and writes nothing.
        #expect(try await chunk(org, lease, worker: worker) == .leaseLost)
        #expect(try await chunk(other, lease, worker: worker) == .expanded(done: 8, finished: false))
        #expect(otherUsers.count == 27)
    }

    @Test("a chunk that keeps failing is retried, a success resets the count, and the tenth failure in a row ends the fan-out FAILED")
    func failingChunks() async throws {
        let (org, _) = try await organisation()
        let id = try await org.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        let env = try await TestEnvironment.shared
        let queue = FanoutQueue(database: env.database, organisation: org.id)
        struct Broken: Error, CustomStringConvertible { var description: String { "the chunk could not be written" } }
        let worker = "fanout-fail-\(UUID().uuidString.prefix(6))"
        // Three failures, then a chunk that works: the count starts again.
        for _ in 0..<3 { try await queue.fail(try #require(try await claim(org, worker: worker)), worker: worker, error: Broken()) }
        var event = try await org.store { tx in try await tx.event(id) }
        #expect(event.fanout?.state == .expanding && event.fanout?.error == "the chunk could not be written")
        let lease = try #require(try await claim(org, worker: worker))
        #expect(try await chunk(org, lease, worker: worker) == .expanded(done: 8, finished: false))
        event = try await org.store { tx in try await tx.event(id) }
        #expect(event.fanout?.error == nil)
        // A stale worker's failure is fenced out.
        #expect(try await org.store { tx in try await tx.failFanout(lease, worker: "someone-else", error: "x") } == nil)
        try await org.store { tx in try await tx.releaseFanout(lease, worker: worker) }
        // Ten in a row: FAILED, what was written stays, nothing is left to claim.
        for _ in 0..<10 { try await queue.fail(try #require(try await claim(org, worker: worker)), worker: worker, error: Broken()) }
        event = try await org.store { tx in try await tx.event(id) }
        #expect(event.fanout?.state == .failed && event.fanout?.done == 8 && event.fanout?.finishedAt != nil)
        #expect(try await rows(org, "notifications", event: id).rows == 8)
        #expect(try await claim(org, worker: worker) == nil)
    }

    @Test(
        "a fan-out heartbeat skips an event whose chunk holds its row instead of waiting for it; the chunk's commit moves the lease's end")
    func heartbeatSkipsABusyEvent() async throws {
        let (org, _) = try await organisation()
        let env = try await TestEnvironment.shared
        let first = try await org.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        let second = try await org.store { tx in try await tx.send(everyone(), now: Date(), fanout: Self.settings).id }
        let claims = try await env.database.claimFanouts(worker: "beating", limit: 2, leaseSeconds: 60, organisation: org.id)
        #expect(Set(claims.map(\.eventID)) == [first, second])
        // A chunk of the first event holds its row (not committed) while the heartbeat runs on
        // another connection: waiting for it would fail on the lock timeout.
        let extended = try await env.database.withTenant(org.id) { chunk in
            try await chunk.query("SELECT 1 FROM events WHERE id = \(first) FOR UPDATE")
            return try await env.database.withTenant(org.id) { tx in
                try await tx.query("SET LOCAL lock_timeout = '5s'")
                return try await tx.extendFanoutLeases(worker: "beating", claims: claims, leaseSeconds: 600)
            }
        }
        #expect(extended == 1)
        let leases = try await org.store { tx in
            try await [first, second].asyncMap { id in
                try await tx.query("SELECT fanout_lease_expires_at > now() + interval '5 minutes' FROM events WHERE id = \(id)")[0]
                    .decode(Bool.self)
            }
        }
        #expect(leases == [false, true])
        // The chunk's own commit moves its lease's end instead.
        let firstClaim = try #require(claims.first { $0.eventID == first })
        let step = try await org.store { tx in
            try await tx.expandChunk(firstClaim, worker: "beating", size: Self.settings.chunkSize, now: Date(), leaseSeconds: 900)
        }
        #expect(step == .expanded(done: Self.settings.chunkSize, finished: false))
        let renewed = try await org.store { tx in
            try await tx.query("SELECT fanout_lease_expires_at > now() + interval '10 minutes' FROM events WHERE id = \(first)")[0]
                .decode(Bool.self)
        }
        #expect(renewed)
    }
}
