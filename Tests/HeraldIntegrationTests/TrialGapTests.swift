import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// What earlier trials of Herald (a newcomer following the README and the docs) found answered
/// wrongly: a typo answered as an empty list, a request that did nothing answered as a success,
/// a state reported by the wrong name.
@Suite("Trials: typos, no-ops and states said plainly")
struct TrialGapTests {
    @Test("a feed filter by a type or category not in the catalogue is a 422 naming it; a known one with no rows is an empty page")
    func feedFilterTypos() async throws {
        try await withCatalogue { org, _, client in
            let type = try await client.send(.get, "/v1/me/notifications?type=ISQ_CRITICLA", token: org.memberToken)
            #expect(type.isProblem(.unprocessableContent) && type.text.contains("ISQ_CRITICLA"), "\(type.text)")
            let category = try await client.send(.get, "/v1/me/notifications?category=alert", token: org.memberToken)
            #expect(category.isProblem(.unprocessableContent) && category.text.contains("\\\"alert\\\""), "\(category.text)")
            for query in ["type=ISQ_CRITICAL", "category=alerts", "type=TASK_ASSIGNED&category=activity"] {
                let known = try await client.send(.get, "/v1/me/notifications?\(query)", token: org.memberToken)
                #expect(known.status == .ok && known.text.contains("\"items\":[]"), "\(query): \(known.text)")
            }
        }
    }

    @Test("the audit log refuses an action Herald never records (422 with the actions of that kind); every recorded action is known")
    func auditActionTypos() async throws {
        try await withOrganisation { org, client in
            let typo = try await client.send(.get, "/v1/audit-log?action=user.creat", token: org.ownerToken)
            #expect(typo.isProblem(.unprocessableContent) && typo.text.contains("user.create"), "\(typo.text)")
            // Known, with nothing recorded yet (a ternary in the sources names the last two).
            for action in ["schedule.run", "user.deactivate", "user.reactivate", "group.member.add", "group.member.remove"] {
                let known = try await client.send(.get, "/v1/audit-log?action=\(action)", token: org.ownerToken)
                #expect(known.status == .ok && known.text.contains("\"items\":[]"), "\(action): \(known.text)")
            }
        }
        // Every action the sources record is in the list the filter checks.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let sources = root.appendingPathComponent("Sources")
        var recorded: Set<String> = []
        let files = try #require(FileManager.default.enumerator(at: sources, includingPropertiesForKeys: nil))
        // Every literal of an action's shape on a line that passes `action:` (a ternary gives two).
        let literal = try Regex(#""([a-z_]+(\.[a-z_]+)+)""#)
        for case let file as URL in files where file.pathExtension == "swift" {
            for line in try String(contentsOf: file, encoding: .utf8).split(separator: "\n") where line.contains("action: ") {
                for match in line.matches(of: literal) { recorded.insert(String(line[match.range].dropFirst().dropLast())) }
            }
        }
        #expect(recorded.count > 40)
        #expect(recorded.subtracting(AuditAction.known).isEmpty, "not in AuditAction.known: \(recorded.subtracting(AuditAction.known))")
        #expect(AuditAction.known.subtracting(recorded).isEmpty, "recorded nowhere: \(AuditAction.known.subtracting(recorded))")
    }

    @Test("mark-read with \"all\": false is a 422, and marks nothing")
    func markReadAllFalse() async throws {
        try await withCatalogue { org, _, client in
            _ = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(org.memberID.uuidString.lowercased())"]},"payload":{}}"#)
            let refused = try await client.send(.post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"all":false}"#)
            #expect(refused.isProblem(.unprocessableContent) && refused.text.contains("all"), "\(refused.text)")
            let count = try await client.send(.get, "/v1/me/notifications/unread-count", token: org.memberToken)
            #expect(count.text.contains("\"total\":1"), "\(count.text)")
        }
    }

    @Test("explain and stats answer an unknown user alike: 404")
    func unknownUserIsNotFound() async throws {
        try await withCatalogue { org, _, client in
            let nobody = UUID().uuidString.lowercased()
            let stats = try await client.send(.get, "/v1/notifications/stats?user_id=\(nobody)", token: org.ownerToken)
            let debug = try await client.send(.get, "/v1/notifications/debug?event=ISQ_CRITICAL&user_id=\(nobody)", token: org.ownerToken)
            #expect(stats.isProblem(.notFound) && debug.isProblem(.notFound), "\(stats.text) \(debug.text)")
            let sent = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(org.memberID.uuidString.lowercased())"]},"payload":{}}"#)
            let event = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            #expect(
                try await client.send(.get, "/v1/events/\(event)/explain?user_id=\(nobody)", token: org.ownerToken).isProblem(.notFound))
            let member = org.memberID.uuidString.lowercased()
            #expect(
                try await client.send(.get, "/v1/notifications/debug?event=ISQ_CRITICAL&user_id=\(member)", token: org.ownerToken).status
                    == .ok)
        }
    }

    @Test("OPTIONS on a path of the contract is a 204 with Allow, no credential needed; an unknown path stays 404")
    func plainOptions() async throws {
        try await withOrganisation { _, client in
            let me = try await client.send(.options, "/v1/me")
            #expect(me.status == .noContent && me.headers[.allow] == "GET, HEAD, OPTIONS, PATCH" && me.text.isEmpty, "\(me.text)")
            let events = try await client.send(.options, "/v1/events")
            #expect(events.headers[.allow] == "GET, HEAD, OPTIONS, POST")
            #expect(try await client.send(.options, "/v1/nothing-here").isProblem(.notFound))
        }
    }

    @Test("refusals to a proven credential carry the organisation's rate, as its successes do")
    func refusalsCarryTheRate() async throws {
        try await withOrganisation(configure: {
            $0.rateLimitRequests = 100
            $0.rateLimitBurstSeconds = 1
        }) { org, client in
            let policy = HTTPField.Name("RateLimit-Policy")!
            let ok = try await client.send(.get, "/v1/me", token: org.memberToken)
            let forbidden = try await client.send(.get, "/v1/users", token: org.memberToken)
            let missing = try await client.send(.get, "/v1/users/\(UUID().uuidString.lowercased())", token: org.ownerToken)
            let invalid = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key":"x y","name":"X"}"#)
            for (answer, status) in [
                (ok, HTTPResponse.Status.ok), (forbidden, .forbidden), (missing, .notFound), (invalid, .unprocessableContent),
            ] {
                #expect(answer.status == status, "\(answer.text)")
                #expect(answer.headers[policy] == #""requests";q=100;w=1"#, "\(status): \(answer.headers)")
                #expect(answer.headers[values: HTTPField.Name("RateLimit")!].count == 1)
            }
            // No credential, no organisation: no rate to say.
            #expect(try await client.send(.get, "/v1/users").headers[policy] == nil)
        }
    }

    @Test("users.manage does not reach a user who holds more: a 403 that says why, and nothing changes")
    func escalationSaysWhy() async throws {
        try await withOrganisation { org, client in
            try await org.store { tx in
                let helpdesk = try await tx.createRole(
                    key: "helpdesk", name: "Helpdesk", description: "", permissions: [.usersRead, .usersManage])
                _ = try await tx.setUserRoles(org.memberID, [helpdesk.id])
            }
            let refused = try await client.send(
                .post, "/v1/users/\(org.ownerID.uuidString.lowercased())/deactivate", token: org.memberToken)
            #expect(refused.isProblem(.forbidden), "\(refused.text)")
            #expect((refused.json["detail"] as? String)?.contains("which you do not hold") == true, "\(refused.text)")
            let owner = try await org.store { tx in try await tx.user(org.ownerID) }
            #expect(owner.active)
        }
    }

    @Test("apikeys.manage does not revoke a key whose role holds more: a 403 that says why, and the key still works")
    func revokeNeedsWhatTheKeyHolds() async throws {
        try await withOrganisation { org, client in
            let (strong, weak) = try await org.store { tx in
                let lead = try await tx.createRole(
                    key: "support-lead", name: "Support lead", description: "", permissions: [.apikeysManage, .usersRead])
                _ = try await tx.setUserRoles(org.memberID, [lead.id])
                let owner = try #require(try await tx.roles().first { $0.key == "owner" })
                let strong = try await tx.createApiKey(
                    id: UUID(), name: "integration", roleID: owner.id, secretHash: Data(repeating: 1, count: 32), expiresAt: nil)
                let weak = try await tx.createApiKey(
                    id: UUID(), name: "helper", roleID: lead.id, secretHash: Data(repeating: 2, count: 32), expiresAt: nil)
                return (strong.id, weak.id)
            }
            let refused = try await client.send(.delete, "/v1/api-keys/\(strong.uuidString.lowercased())", token: org.memberToken)
            #expect(refused.isProblem(.forbidden) && refused.text.contains("which you do not hold"), "\(refused.text)")
            #expect(try await org.store { tx in try await tx.apiKey(strong) }.revokedAt == nil)
            // A key of what the caller holds is theirs to revoke.
            let revoked = try await client.send(.delete, "/v1/api-keys/\(weak.uuidString.lowercased())", token: org.memberToken)
            #expect(revoked.status == .noContent, "\(revoked.text)")
        }
    }

    @Test("explain says EXPIRED for an in-app row past its expires_at, before and after it is purged")
    func expiredIsNotDeleted() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let clock = TestClock()
        try await TestEnvironment.shared.application(now: { clock.now() }).test(.router) { client in
            let until = ISO8601DateFormatter().string(from: clock.now().addingTimeInterval(60))
            let sent = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json:
                    #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(org.memberID.uuidString.lowercased())"]},"expires_at":"\#(until)"}"#
            )
            let event = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            func status() async throws -> String? {
                let explained = try await client.send(.get, "/v1/events/\(event)/explain", token: org.ownerToken)
                return try explained.decoded(Components.Schemas.Explanation.self).items.first?.channels.first { $0.channel == .inApp }?
                    .notificationStatus?.rawValue
            }
            #expect(try await status() == "UNREAD")
            clock.advance(120) // (within the access token's 15 minutes)
            #expect(try await status() == "EXPIRED")
            _ = try await org.store { tx in try await tx.query("DELETE FROM notifications WHERE organisation_id = \(org.id)") }
            #expect(try await status() == "EXPIRED", "purged after expiry, not deleted by its user")
        }
    }

    @Test("importing preference defaults without organisation.manage is a 403 naming it")
    func catalogueNeedsOrganisationManage() async throws {
        try await withOrganisation { org, client in
            try await org.store { tx in
                let editor = try await tx.createRole(key: "editor", name: "Editor", description: "", permissions: [.templatesManage])
                _ = try await tx.setUserRoles(org.memberID, [editor.id])
            }
            let refused = try await client.send(
                .put, "/v1/catalogue", token: org.memberToken, json: #"{"categories":[],"types":[],"preference_defaults":[]}"#)
            #expect(refused.isProblem(.forbidden), "\(refused.text)")
            #expect(
                (refused.json["detail"] as? String) == #"This operation needs the permission "organisation.manage"."#, "\(refused.text)")
        }
    }

    @Test("the demo page answers HEAD as GET, without the body")
    func demoPageHead() async throws {
        try await withOrganisation(configure: { $0.demoPages = true }) { _, client in
            let get = try await client.send(.get, "/demo/bell")
            let head = try await client.send(.head, "/demo/bell")
            #expect(get.status == .ok && !get.text.isEmpty)
            #expect(head.status == .ok && head.text.isEmpty && head.headers[.contentType] == get.headers[.contentType])
        }
    }

    @Test("an Idempotency-Key beginning with schedule: is a 422: those name schedules' occurrences")
    func scheduleKeysReserved() async throws {
        try await withCatalogue { org, _, client in
            let body = #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(org.memberID.uuidString.lowercased())"]},"payload":{}}"#
            let refused = try await client.send(
                .post, "/v1/events", token: org.ownerToken, json: body,
                headers: [.init("Idempotency-Key")!: "schedule:\(UUID().uuidString.lowercased()):1"])
            #expect(refused.isProblem(.unprocessableContent) && refused.text.contains("Idempotency-Key"), "\(refused.text)")
            let count = try await org.store { tx in try await tx.query("SELECT count(*) FROM events").first!.decode(Int.self) }
            #expect(count == 0)
        }
    }

    @Test("a wrong body or a missing part is a 400 in the API's words: what the field takes, a misspelt field named")
    func boundaryWords() async throws {
        try await withCatalogue { org, _, client in
            func detail(_ response: TestResponse) -> String { (response.json["detail"] as? String) ?? response.text }
            let array = try await client.send(
                .post, "/v1/events", token: org.ownerToken, json: #"{"type":"ISQ_CRITICAL","audience":{"everyone":true},"payload":[1]}"#)
            #expect(array.isProblem(.badRequest) && detail(array) == "payload: must be a JSON object, not an array.", "\(array.text)")
            let string = try await client.send(.post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"all":"true"}"#)
            #expect(detail(string) == "all: must be true or false, not a string.", "\(string.text)")
            let misspelt = try await client.send(
                .post, "/v1/events", token: org.ownerToken, json: #"{"type":"ISQ_CRITICAL","audiance":{"everyone":true}}"#)
            #expect(misspelt.isProblem(.badRequest) && detail(misspelt).contains(#"The body has "audiance""#), "\(misspelt.text)")
            let missing = try await client.send(.get, "/v1/notifications/debug", token: org.ownerToken)
            #expect(missing.isProblem(.badRequest) && detail(missing) == "event: this query parameter is required.", "\(missing.text)")
            let none = try await client.send(.post, "/v1/events", token: org.ownerToken)
            #expect(none.isProblem(.badRequest) && detail(none).contains("JSON body"), "\(none.text)")
        }
    }

    @Test("a condition the decoder cannot read is a 400 saying what is wrong with it")
    func conditionWords() async throws {
        try await withCatalogue { org, _, client in
            func put(_ condition: String) async throws -> String {
                let answer = try await client.send(
                    .put, "/v1/me/preferences", token: org.memberToken,
                    json:
                        #"{"items":[{"category":"activity","channel":"email","enabled":true,"frequency":"IMMEDIATE","conditions":[\#(condition)]}]}"#
                )
                #expect(answer.isProblem(.badRequest), "\(condition): \(answer.text)")
                return (answer.json["detail"] as? String) ?? answer.text
            }
            let said = [
                try await put(#"{"field":"payload.n","op":"between","value":1}"#),
                try await put(#"{"field":"payload.n","op":"gte","value":true}"#),
                try await put(#"{"field":"payload.d","op":"weekday_in","values":["Monday"]}"#),
                try await put(#"{"field":"payload.n","op":"in","value":1}"#),
                try await put(#"{"op":"equals","value":1}"#),
            ]
            for (detail, part) in zip(
                said,
                [#"op "between" is not one of"#, "a number, a date", #""Monday" is not a weekday"#, #"not "value""#, #"needs a "field""#])
            {
                #expect(detail.hasPrefix("items[0].conditions[0]: ") && detail.contains(part), "\(detail)")
            }
        }
    }

    @Test("deliver_at at most 366 days ahead: later is a 422 naming it, and nothing is written")
    func deliverAtBound() async throws {
        try await withCatalogue { org, _, client in
            func notify(inDays days: Double) async throws -> TestResponse {
                let at = ISO8601DateFormatter().string(from: Date().addingTimeInterval(days * 86_400))
                return try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json:
                        #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(org.memberID.uuidString.lowercased())"]},"deliver_at":"\#(at)"}"#
                )
            }
            let far = try await notify(inDays: 2 * 365)
            #expect(far.isProblem(.unprocessableContent) && far.text.contains("deliver_at"), "\(far.text)")
            let count = try await org.store { tx in try await tx.query("SELECT count(*) FROM events").first!.decode(Int.self) }
            #expect(count == 0)
            #expect(try await notify(inDays: 300).status == .accepted)
        }
    }

    @Test("explain says SCHEDULED for an in-app row not shown yet, WITHDRAWN once a cancel took it back, DELETED for one its user deleted")
    func withdrawnIsNotDeleted() async throws {
        try await withCatalogue { org, _, client in
            let member = org.memberID.uuidString.lowercased()
            func notify(_ extra: String) async throws -> String {
                let sent = try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json: #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(member)"]},"payload":{}\#(extra)}"#)
                #expect(sent.status == .accepted, "\(sent.text)")
                return try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            }
            func status(_ event: String) async throws -> String? {
                let explained = try await client.send(.get, "/v1/events/\(event)/explain", token: org.ownerToken)
                let body = try explained.decoded(Components.Schemas.Explanation.self)
                return body.items.first?.channels.first { $0.channel == .inApp }?.notificationStatus?.rawValue
            }
            let later = ISO8601DateFormatter().string(from: Date().addingTimeInterval(3_600))
            let scheduled = try await notify(#","deliver_at":"\#(later)""#)
            #expect(try await status(scheduled) == "SCHEDULED", "not UNREAD: the member cannot see it yet")
            // Clearing the feed takes what has appeared; the row still to come stays (feed.md).
            #expect(try await client.send(.delete, "/v1/me/notifications", token: org.memberToken).text == #"{"count":0}"#)
            #expect(try await status(scheduled) == "SCHEDULED")
            #expect(try await client.send(.post, "/v1/events/\(scheduled)/cancel", token: org.ownerToken).status == .ok)
            #expect(try await status(scheduled) == "WITHDRAWN")
            let shown = try await notify("")
            let feed = try await client.send(.get, "/v1/me/notifications", token: org.memberToken)
            let row = try #require(try feed.decoded(Components.Schemas.FeedPage.self).items.first { $0.eventId == shown })
            #expect(try await client.send(.delete, "/v1/me/notifications/\(row.id)", token: org.memberToken).status == .noContent)
            // Cancelled after it was shown and deleted: still the user's doing.
            _ = try await client.send(.post, "/v1/events/\(shown)/cancel", token: org.ownerToken)
            #expect(try await status(shown) == "DELETED")
        }
    }
}
