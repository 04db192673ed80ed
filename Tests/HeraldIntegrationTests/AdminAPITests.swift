import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

@Suite("Admin API")
struct AdminAPITests {
    @Test("create, read, update, search and page through users; every change is audited with before and after")
    func usersLifecycle() async throws {
        try await withOrganisation { org, client in
            // setup
            let created = try await client.send(
                .post, "/v1/users", token: org.ownerToken,
                json: """
                    {"email": "dr.bob@clinic.example", "display_name": "Dr Bob", "locale": "fr", "timezone": "Europe/Paris", "attributes": {"team": "implants"}}
                    """)
            #expect(created.status == .created)
            let id = try created.decoded(Components.Schemas.User.self).id

            // act
            let updated = try await client.send(
                .patch, "/v1/users/\(id)", token: org.ownerToken, json: #"{"display_name": "Dr Robert", "locale": ""}"#)
            let search = try await client.send(.get, "/v1/users?q=ROBERT", token: org.ownerToken)
            let audit = try await client.send(.get, "/v1/audit-log?target_id=\(id)", token: org.ownerToken)

            // check
            #expect(updated.status == .ok)
            let user = try updated.decoded(Components.Schemas.User.self)
            #expect(user.displayName == "Dr Robert")
            #expect(user.locale == nil)
            // attributes is a free-form object: read through the dictionary.
            #expect((updated.json["attributes"] as? [String: Any])?["team"] as? String == "implants")
            #expect(try search.decoded(Components.Schemas.UserPage.self).items.map(\.id) == [id])
            let entries = try audit.decoded(Components.Schemas.AuditPage.self).items
            #expect(entries.map(\.action) == ["user.update", "user.create"])
            let update = try #require(entries.first)
            #expect(update.actorType == .user)
            #expect(update.actorId == org.ownerID.uuidString.lowercased())
            #expect(update.requestId != nil)
            // before and after are free-form: read through the dictionary.
            let raw = try #require((audit.json["items"] as? [[String: Any]])?.first)
            #expect((raw["before"] as? [String: Any])?["display_name"] as? String == "Dr Bob")
            #expect((raw["after"] as? [String: Any])?["display_name"] as? String == "Dr Robert")
            // The same PATCH again changes nothing, and writes no entry.
            let again = try await client.send(
                .patch, "/v1/users/\(id)", token: org.ownerToken, json: #"{"display_name": "Dr Robert", "locale": ""}"#)
            #expect(again.status == .ok)
            let afterAgain = try await client.send(.get, "/v1/audit-log?target_id=\(id)", token: org.ownerToken)
            #expect(try afterAgain.decoded(Components.Schemas.AuditPage.self).items.map(\.action) == ["user.update", "user.create"])
            // Only edits are skipped when nothing shows a change: a secret rotated with no overlap
            // looks the same before and after, and is recorded.
            let same = JSONValue.object(["name": .string("w"), "updated_at": .string("2026-01-01T00:00:00Z")])
            let moved = JSONValue.object(["name": .string("w"), "updated_at": .string("2026-01-02T00:00:00Z")])
            let recorded = try await org.store { tx in
                try await tx.audit(action: "endpoint.rotate_secret", targetType: "endpoint", targetID: "e1", before: same, after: moved)
                try await tx.audit(action: "endpoint.update", targetType: "endpoint", targetID: "e1", before: same, after: moved)
                return try await tx.auditEntries(action: nil, targetID: "e1", limit: 10, after: nil).items.map(\.action)
            }
            #expect(recorded == ["endpoint.rotate_secret"])
        }
    }

    @Test("cursor pagination returns every user exactly once")
    func pagination() async throws {
        try await withOrganisation { org, client in
            try await org.store { tx in
                for i in 0..<25 { _ = try await tx.createUser(NewUser(email: "p\(i)@x.example", displayName: "P\(i)")) }
            }
            var seen: [String] = []
            var cursor: String?
            repeat {
                let page = try await client.send(.get, "/v1/users?limit=7" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken)
                #expect(page.status == .ok)
                let users = try page.decoded(Components.Schemas.UserPage.self)
                seen += users.items.map(\.id)
                cursor = users.nextCursor
            } while cursor != nil
            #expect(seen.count == 27)
            #expect(Set(seen).count == 27)
            let bad = try await client.send(.get, "/v1/users?cursor=garbage", token: org.ownerToken)
            #expect(bad.isProblem(.unprocessableContent))
            // A well-formed cursor whose time PostgreSQL cannot hold (a trial: 500s on every list
            // keyed by time).
            for list in ["/v1/users", "/v1/audit-log", "/v1/events", "/v1/groups", "/v1/endpoints", "/v1/schedules"] {
                let crafted = try await client.send(
                    .get, "\(list)?cursor=eyJ0Ijo5MjIzMzcyMDM2ODU0Nzc1ODA3LCJpIjoiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIn0",
                    token: org.ownerToken)
                #expect(crafted.isProblem(.unprocessableContent) && crafted.text.contains("cursor"), "\(list): \(crafted.status)")
            }
        }
    }

    @Test(
        "bad input gets a problem with a useful detail and writes nothing",
        arguments: [
            (#"{"email": "a@b.example", "display_name": "A", "organisation_id": "x"}"#, 400, "organisation_id"),
            (#"{"email": "a@b.example"}"#, 400, "display_name"),
            (#"{"email": "a@b.example", "display_name": 42}"#, 400, "display_name"),
            (#"{"email": "a@b.example", "display_name": "A""#, 400, "JSON"),
            (#"{"email": "not-an-email", "display_name": "A"}"#, 422, "email"),
            (#"{"email": "a@b.example", "display_name": "A", "timezone": "Mars/Olympus"}"#, 422, "timezone"),
            (#"{"email": "a@b.example", "display_name": "A", "password": "short"}"#, 422, "password"),
        ])
    func badInput(body: String, status: Int, mentions: String) async throws {
        try await withOrganisation { org, client in
            let before = try await org.store { tx in try await tx.users(search: nil, active: nil, limit: 200, after: nil).items.count }
            let response = try await client.send(.post, "/v1/users", token: org.ownerToken, json: body)
            #expect(response.isProblem(HTTPResponse.Status(code: status)), "\(response.status) \(response.text)")
            #expect((response.json["detail"] as? String)?.contains(mentions) == true, "\(response.text)")
            let after = try await org.store { tx in try await tx.users(search: nil, active: nil, limit: 200, after: nil).items.count }
            #expect(before == after)
        }
    }

    @Test("a duplicate email is a 409 and leaves no audit entry behind")
    func duplicateEmail() async throws {
        try await withOrganisation { org, client in
            let entries = try await org.store { tx in
                try await tx.auditEntries(action: nil, targetID: nil, limit: 200, after: nil).items.count
            }
            let response = try await client.send(
                .post, "/v1/users", token: org.ownerToken,
                json: """
                    {"email": "OWNER@\(org.slug).example", "display_name": "Again"}
                    """)
            #expect(response.isProblem(.conflict))
            #expect((response.json["detail"] as? String)?.contains("email") == true)
            let after = try await org.store { tx in
                try await tx.auditEntries(action: nil, targetID: nil, limit: 200, after: nil).items.count
            }
            #expect(entries == after)
        }
    }

    @Test("a body over the limit is refused with 413")
    func bodyLimit() async throws {
        try await withOrganisation(configure: { $0.maxBodyBytes = 1024 }) { org, client in
            let big = String(repeating: "x", count: 2048)
            let response = try await client.send(
                .post, "/v1/users", token: org.ownerToken, json: #"{"email": "a@b.example", "display_name": "\#(big)"}"#)
            #expect(response.isProblem(.contentTooLarge))
        }
    }

    @Test("roles: custom roles carry only permissions the creator holds; built-in roles cannot change")
    func roles() async throws {
        try await withOrganisation { org, client in
            // An admin holds everything but organisation.manage.
            let adminToken = try await org.store { tx in
                let admin = try await tx.createUser(NewUser(email: "admin@x.example", displayName: "Admin"))
                _ = try await tx.setUserRoles(admin.id, [try await tx.builtinRole(.admin).id])
                return admin.id
            }
            let admin = try await TestEnvironment.shared.tokens.issueAccessToken(organisationID: org.id, userID: adminToken, now: Date())
            let auditor = try await client.send(
                .post, "/v1/roles", token: admin, json: #"{"key": "auditor", "name": "Auditor", "permissions": ["audit.read"]}"#)
            #expect(auditor.status == .created)
            let escalate = try await client.send(
                .post, "/v1/roles", token: admin, json: #"{"key": "boss", "name": "Boss", "permissions": ["organisation.manage"]}"#)
            #expect(escalate.isProblem(.forbidden))
            let unknown = try await client.send(
                .post, "/v1/roles", token: admin, json: #"{"key": "odd", "name": "Odd", "permissions": ["root.all"]}"#)
            #expect(unknown.isProblem(.unprocessableContent))
            let duplicate = try await client.send(
                .post, "/v1/roles", token: admin, json: #"{"key": "auditor", "name": "Again", "permissions": []}"#)
            #expect(duplicate.isProblem(.conflict))

            let roles = try await client.send(.get, "/v1/roles", token: admin)
            let items = try roles.decoded(Operations.ListRoles.Output.Ok.Body.JsonPayload.self).items
            let ownerID = try #require(items.first { $0.key == "owner" }).id
            #expect(
                try await client.send(.patch, "/v1/roles/\(ownerID)", token: org.ownerToken, json: #"{"name": "Boss"}"#).isProblem(
                    .conflict))
            #expect(try await client.send(.delete, "/v1/roles/\(ownerID)", token: org.ownerToken).isProblem(.conflict))
            // An admin cannot make someone owner (owner carries organisation.manage).
            let grant = try await client.send(
                .put, "/v1/users/\(org.memberID.uuidString)/roles", token: admin, json: #"{"role_ids": ["\#(ownerID)"]}"#)
            #expect(grant.isProblem(.forbidden))
            // The last owner cannot lose the role.
            let demote = try await client.send(
                .put, "/v1/users/\(org.ownerID.uuidString)/roles", token: org.ownerToken, json: #"{"role_ids": []}"#)
            #expect(demote.isProblem(.conflict))
        }
    }

    @Test(
        "an import creates many users in one call and adds them to a group; all or none: a bad item is a 422 naming it, a taken address a 409 unless skipped"
    )
    func importUsers() async throws {
        try await withOrganisation { org, client in
            let group = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key": "import", "name": "Import"}"#)
            let groupID = try group.decoded(Components.Schemas.Group.self).id
            let users = try await org.store { tx in try await tx.query("SELECT count(*)::int FROM users")[0].decode(Int.self) }
            func send(_ json: String) async throws -> TestResponse {
                try await client.send(.post, "/v1/users/import", token: org.ownerToken, json: json)
            }
            // A bad item, a repeated address, an address taken without skip_existing: nothing written.
            let bad = try await send(
                #"{"users": [{"email": "a@imp.example", "display_name": "A"}, {"email": "not an address", "display_name": "B"}]}"#)
            #expect(
                bad.isProblem(.unprocessableContent) && (bad.json["detail"] as? String)?.contains("users[1].email") == true, "\(bad.text)")
            let twice = try await send(
                #"{"users": [{"email": "a@imp.example", "display_name": "A"}, {"email": "A@imp.example", "display_name": "A2"}]}"#)
            #expect(
                twice.isProblem(.conflict) && (twice.json["detail"] as? String)?.contains("users[0]") == true, "\(twice.text)")
            let taken = try await send(
                #"{"users": [{"email": "a@imp.example", "display_name": "A"}, {"email": "member@\#(org.slug).example", "display_name": "M"}], "group_ids": ["\#(groupID)"]}"#
            )
            #expect(taken.isProblem(.conflict) && (taken.json["detail"] as? String)?.contains("users[1].email") == true, "\(taken.text)")
            #expect(try await org.store { tx in try await tx.query("SELECT count(*)::int FROM users")[0].decode(Int.self) } == users)
            #expect(try await client.send(.get, "/v1/groups/\(groupID)", token: org.ownerToken).json["member_count"] as? Int == 0)

            // Skipped: the member stays as it is, both join the group.
            let imported = try await send(
                #"{"users": [{"email": "a@imp.example", "display_name": "A", "locale": "fr", "attributes": {"team": "x"}, "digest_hour": 14, "digest_weekday": 2}, {"email": "member@\#(org.slug).example", "display_name": "M"}], "skip_existing": true, "group_ids": ["\#(groupID)"]}"#
            )
            #expect(imported.status == .ok, "\(imported.text)")
            let result = try imported.decoded(Components.Schemas.UserImportResult.self)
            #expect(result.created == 1 && result.existing == 1 && result.users.map(\.created) == [true, false])
            #expect(result.users[1].id == org.memberID.lowercased)
            let made = try await client.send(.get, "/v1/users/\(result.users[0].id)", token: org.ownerToken)
            #expect(made.json["locale"] as? String == "fr" && (made.json["attributes"] as? [String: Any])?["team"] as? String == "x")
            // Their own digest time, given with the import (a trial needed a PATCH per user).
            #expect(made.json["digest_hour"] as? Int == 14 && made.json["digest_weekday"] as? Int == 2, "\(made.text)")
            let created = try await client.send(
                .post, "/v1/users", token: org.ownerToken, json: #"{"email": "b@imp.example", "display_name": "B", "digest_hour": 0}"#)
            #expect(
                created.status == .created && created.json["digest_hour"] as? Int == 0 && created.json["digest_weekday"] == nil,
                "\(created.text)")
            let late = try await send(#"{"users": [{"email": "c@imp.example", "display_name": "C", "digest_hour": 24}]}"#)
            #expect(
                late.isProblem(.badRequest) || (late.isProblem(.unprocessableContent) && late.text.contains("users[0].digest_hour")),
                "\(late.text)")
            #expect(
                try await client.send(.get, "/v1/users/\(org.memberID.lowercased)", token: org.ownerToken).json["display_name"] as? String
                    != "M")
            #expect(try await client.send(.get, "/v1/groups/\(groupID)", token: org.ownerToken).json["member_count"] as? Int == 2)
            // Audited once, and the group's new members under the group, by their ids.
            let audited = try await org.store { tx in
                try await tx.query("SELECT count(*)::int FROM audit_log WHERE action = 'user.import'")[0].decode(Int.self)
            }
            #expect(audited == 1)
            let groupLog = try await client.send(.get, "/v1/audit-log?target_id=\(groupID)&action=group.member.add", token: org.ownerToken)
            let added = (groupLog.json["items"] as? [[String: Any]])?.first?["after"] as? [String: Any]
            #expect(Set(added?["user_ids"] as? [String] ?? []) == Set(result.users.map(\.id)), "\(groupLog.text)")
            // A member without users.manage cannot.
            #expect(
                try await client.send(
                    .post, "/v1/users/import", token: org.memberToken,
                    json: #"{"users": [{"email": "b@imp.example", "display_name": "B"}]}"#
                ).isProblem(.forbidden))
            // Again, with the address in other letters and the member deactivated: nothing is
            // created or added, so nothing is audited; the answer gives the address as stored.
            _ = try await client.send(.post, "/v1/users/\(org.memberID.lowercased)/deactivate", token: org.ownerToken)
            let again = try await send(
                #"{"users": [{"email": "MEMBER@\#(org.slug.uppercased()).example", "display_name": "M"}], "skip_existing": true, "group_ids": ["\#(groupID)"]}"#
            )
            let repeated = try again.decoded(Components.Schemas.UserImportResult.self)
            #expect(
                repeated.users.map(\.email) == ["member@\(org.slug).example"] && repeated.users.map(\.active) == [false], "\(again.text)")
            let entries = try await org.store { tx in
                try await tx.query("SELECT count(*)::int FROM audit_log WHERE action IN ('user.import', 'group.member.add')")[0].decode(
                    Int.self)
            }
            #expect(entries == 2)
            // An empty import, and a group that is not there, named by its place.
            let empty = try await send(#"{"users": []}"#)
            #expect(
                empty.isProblem(.unprocessableContent) && (empty.json["detail"] as? String)?.hasPrefix("users") == true, "\(empty.text)")
            let unknown = try await send(
                #"{"users": [{"email": "c@imp.example", "display_name": "C"}], "group_ids": ["\#(groupID)", "\#(UUID().uuidString)"]}"#)
            #expect(
                unknown.isProblem(.unprocessableContent) && (unknown.json["detail"] as? String)?.hasPrefix("group_ids[1]") == true,
                "\(unknown.text)")
        }
    }

    @Test(
        "a user is erased with everything recorded about them; not while a message to them is being sent, nor while a schedule names them")
    func eraseUser() async throws {
        try await withCatalogue { org, catalogue, client in
            let member = org.memberID
            let group = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key": "erase", "name": "Erase"}"#)
            let groupID = try group.decoded(Components.Schemas.Group.self).id
            #expect(
                try await client.send(.put, "/v1/groups/\(groupID)/members/\(member.lowercased)", token: org.ownerToken).status
                    == .noContent)
            // The member renamed (an audit entry with their name), with a stream open (their
            // changes are logged), then an event to them (in-app and email) and to another user,
            // so the event stays.
            let renamed = try await client.send(
                .patch, "/v1/users/\(member.lowercased)", token: org.ownerToken, json: #"{"display_name": "Dr Member"}"#)
            #expect(renamed.status == .ok)
            _ = try await org.store { tx in try await tx.openFeedStream(of: member) }
            let other = try await org.store { tx in try await tx.createUser(NewUser(email: "other@x.example", displayName: "Other")).id }
            let (event, _) = try await org.notify(
                EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [member, other]), payload: .object([:])))
            // And a task waiting for the member's daily digest.
            try await org.store { tx in
                try await tx.replacePreferences(
                    ofUser: member,
                    with: [
                        PreferenceCell(
                            categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                    ])
            }
            try await org.assignTask(to: [member], title: "waits for the digest")
            func rows(of user: UUID) async throws -> [Int] {
                let counts = try await org.store { tx in
                    try await tx.query(
                        """
                        SELECT (SELECT count(*) FROM users WHERE id = \(user))::int, (SELECT count(*) FROM notifications WHERE user_id = \(user))::int,
                               (SELECT count(*) FROM deliveries WHERE user_id = \(user))::int, (SELECT count(*) FROM event_recipients WHERE user_id = \(user))::int,
                               (SELECT count(*) FROM group_members WHERE user_id = \(user))::int, (SELECT count(*) FROM user_roles WHERE user_id = \(user))::int,
                               (SELECT count(*) FROM feed_streams WHERE user_id = \(user))::int, ((SELECT count(*) FROM feed_due WHERE user_id = \(user)) + (SELECT count(*) FROM feed_changes WHERE user_id = \(user)))::int
                        """
                    )[0].decode((Int, Int, Int, Int, Int, Int, Int, Int).self)
                }
                return [counts.0, counts.1, counts.2, counts.3, counts.4, counts.5, counts.6, counts.7]
            }
            let before = try await rows(of: member)
            #expect(before.allSatisfy { $0 > 0 }, "\(before)")
            // Refused while a schedule names the member, and while their email is being sent.
            let schedule = try await org.store { tx in
                try await tx.createSchedule(
                    id: UUID(), name: "weekly",
                    event: EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [member]), payload: .object([:])),
                    rule: "FREQ=DAILY", timeZone: "UTC", startsAt: Date(), nextAt: Date().addingTimeInterval(86_400)
                ).id
            }
            let named = try await client.send(.delete, "/v1/users/\(member.lowercased)", token: org.ownerToken)
            #expect(named.isProblem(.conflict) && (named.json["detail"] as? String)?.contains("weekly") == true, "\(named.text)")
            #expect(try await client.send(.delete, "/v1/schedules/\(schedule.lowercased)", token: org.ownerToken).status == .noContent)
            let env = try await TestEnvironment.shared
            let claimed = try await env.workerDatabase.claimDeliveries(worker: "erase", limit: 10, leaseSeconds: 60, organisation: org.id)
            let sending = try await client.send(.delete, "/v1/users/\(member.lowercased)", token: org.ownerToken)
            #expect(sending.isProblem(.conflict) && (sending.json["detail"] as? String)?.contains("being sent") == true, "\(sending.text)")
            #expect(try await rows(of: member) == before, "a refusal leaves everything")
            _ = try await org.store { tx in
                try await tx.releaseDeliveries(claimed.map { ($0, Date()) }, worker: "erase")
            }
            // Not yourself; nor by someone who lacks what the user holds.
            #expect(try await client.send(.delete, "/v1/users/\(org.ownerID.lowercased)", token: org.ownerToken).isProblem(.conflict))
            #expect(try await client.send(.delete, "/v1/users/\(org.ownerID.lowercased)", token: org.memberToken).isProblem(.forbidden))
            // Erased: the rows about them, their token; the event stays for the other recipient.
            let erased = try await client.send(.delete, "/v1/users/\(member.lowercased)", token: org.ownerToken)
            #expect(erased.status == .noContent, "\(erased.text)")
            #expect(try await rows(of: member) == [0, 0, 0, 0, 0, 0, 0, 0])
            #expect(try await rows(of: other)[1...3] == [1, 1, 1])
            #expect(try await client.send(.get, "/v1/users/\(member.lowercased)", token: org.ownerToken).isProblem(.notFound))
            #expect(try await client.send(.get, "/v1/me", token: org.memberToken).status == .unauthorized)
            #expect(try await client.send(.get, "/v1/events/\(event.id.lowercased)", token: org.ownerToken).status == .ok)
            #expect(try await client.send(.delete, "/v1/users/\(member.lowercased)", token: org.ownerToken).isProblem(.notFound))
            // Audited by id and counts; the earlier entry about the member keeps its action, not
            // their name or address.
            let log = try await client.send(.get, "/v1/audit-log?target_id=\(member.lowercased)", token: org.ownerToken)
            let entries = log.json["items"] as? [[String: Any]] ?? []
            #expect(entries.map { $0["action"] as? String } == ["user.delete", "user.update"], "\(log.text)")
            #expect(!log.text.contains("member@") && !log.text.contains("Dr Member"), "\(log.text)")
            let counted = (entries.first?["after"] as? [String: Any])?["erased"] as? [String: Any]
            #expect(counted?["deliveries"] as? Int == 1 && counted?["digest_items"] as? Int == 1, "\(log.text)")
            #expect((entries.last?["before"] as? [String: Any])?["erased"] as? Bool == true, "\(log.text)")
        }
    }

    @Test("groups hold members; membership changes are idempotent")
    func groups() async throws {
        try await withOrganisation { org, client in
            let created = try await client.send(
                .post, "/v1/groups", token: org.ownerToken, json: #"{"key": "internship-2026", "name": "Internship 2026"}"#)
            let id = try created.decoded(Components.Schemas.Group.self).id
            let member = org.memberID.uuidString.lowercased()
            #expect(try await client.send(.put, "/v1/groups/\(id)/members/\(member)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.put, "/v1/groups/\(id)/members/\(member)", token: org.ownerToken).status == .noContent)
            let group = try await client.send(.get, "/v1/groups/\(id)", token: org.ownerToken)
            #expect(try group.decoded(Components.Schemas.Group.self).memberCount == 1)
            let members = try await client.send(.get, "/v1/groups/\(id)/members", token: org.ownerToken)
            #expect(try members.decoded(Components.Schemas.UserPage.self).items.map(\.id) == [member])
            #expect(try await client.send(.delete, "/v1/groups/\(id)/members/\(member)", token: org.ownerToken).status == .noContent)
            let emptied = try await client.send(.get, "/v1/groups/\(id)", token: org.ownerToken)
            #expect(try emptied.decoded(Components.Schemas.Group.self).memberCount == 0)
        }
    }

    /// A key of the built-in service role, made through the API by the owner; its secret.
    func serviceKey(_ org: TestOrganisation, _ client: some TestClientProtocol, name: String) async throws -> String {
        let serviceRole = try await org.store { tx in try await tx.builtinRole(.service).id.uuidString.lowercased() }
        let created = try await client.send(
            .post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "\#(name)", "role_id": "\#(serviceRole)"}"#)
        return try created.decoded(Components.Schemas.ApiKeyCreated.self).secret
    }

    @Test("a backend's key starts a session for one of its users (the bell embedded without a Herald password), within what it holds")
    func backendStartsUserSessions() async throws {
        try await withOrganisation { org, client in
            let key = try await serviceKey(org, client, name: "CRM")
            // The member's session: their own feed, their own permissions, and it ends at logout.
            let started = try await client.send(.post, "/v1/users/\(org.memberID.uuidString)/sessions", token: key)
            #expect(started.status == .created, "\(started.text)")
            let pair = try started.decoded(Components.Schemas.TokenPair.self)
            #expect(try await client.send(.get, "/v1/me/notifications/unread-count", token: pair.accessToken).status == .ok)
            let me = try await client.send(.get, "/v1/me", token: pair.accessToken).decoded(Components.Schemas.Principal.self)
            #expect(me.userId == org.memberID.lowercased && me.kind == .user)
            #expect(try await client.send(.get, "/v1/users", token: pair.accessToken).isProblem(.forbidden))
            #expect(try await client.send(.post, "/v1/auth/refresh", json: #"{"refresh_token": "\#(pair.refreshToken)"}"#).status == .ok)
            let audited = try await org.store { tx in
                try await tx.query(
                    "SELECT count(*)::int FROM audit_log WHERE organisation_id = \(org.id) AND action = 'user.session.start' AND target_id = \(org.memberID.lowercased)"
                )[0].decode(Int.self)
            }
            #expect(audited == 1)
            // Not the owner's (the key lacks organisation.manage), nor anyone's of another organisation.
            #expect(try await client.send(.post, "/v1/users/\(org.ownerID.uuidString)/sessions", token: key).isProblem(.forbidden))
            let other = try await TestOrganisation.make()
            #expect(try await client.send(.post, "/v1/users/\(other.memberID.uuidString)/sessions", token: key).isProblem(.notFound))
            // A member cannot start sessions; a deactivated user gets none.
            #expect(
                try await client.send(.post, "/v1/users/\(org.ownerID.uuidString)/sessions", token: org.memberToken).isProblem(.forbidden))
            _ = try await client.send(.post, "/v1/users/\(org.memberID.uuidString)/deactivate", token: org.ownerToken)
            #expect(try await client.send(.post, "/v1/users/\(org.memberID.uuidString)/sessions", token: key).isProblem(.conflict))
            #expect(try await client.send(.get, "/v1/me", token: pair.accessToken).isProblem(.unauthorized))
        }
    }

    @Test("users a backend creates or imports with its key are members: their session reads their own feed (a trial's bell got 403)")
    func createdUsersAreMembers() async throws {
        try await withOrganisation { org, client in
            let key = try await serviceKey(org, client, name: "CRM")
            let made = try await client.send(
                .post, "/v1/users", token: key, json: #"{"email": "ny@\#(org.slug).example", "display_name": "New York"}"#)
            #expect(made.status == .created, "\(made.text)")
            let user = try made.decoded(Components.Schemas.User.self)
            #expect(user.roles.map(\.key) == ["member"], "\(made.text)")
            let imported = try await client.send(
                .post, "/v1/users/import", token: key,
                json: #"{"users": [{"email": "tk@\#(org.slug).example", "display_name": "Tokyo"}]}"#)
            #expect(imported.status == .ok, "\(imported.text)")
            let importedID = try #require(try imported.decoded(Components.Schemas.UserImportResult.self).users.first?.id)
            for id in [user.id, importedID] {
                let started = try await client.send(.post, "/v1/users/\(id)/sessions", token: key)
                #expect(started.status == .created, "\(started.text)")
                let token = try started.decoded(Components.Schemas.TokenPair.self).accessToken
                #expect(try await client.send(.get, "/v1/me/notifications", token: token).status == .ok)
                #expect(try await client.send(.get, "/v1/me/preferences/resolved", token: token).status == .ok)
                // Nothing beyond their own feed and settings.
                #expect(try await client.send(.get, "/v1/users", token: token).isProblem(.forbidden))
            }
        }
    }

    @Test("API keys: the secret is shown once, works as a credential, and stops working when revoked")
    func apiKeys() async throws {
        try await withOrganisation { org, client in
            let serviceRole = try await org.store { tx in try await tx.builtinRole(.service).id.uuidString.lowercased() }
            let created = try await client.send(
                .post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "CRM", "role_id": "\#(serviceRole)"}"#)
            #expect(created.status == .created)
            let apiKey = try created.decoded(Components.Schemas.ApiKeyCreated.self)
            let secret = apiKey.secret
            let id = apiKey.id
            let listed = try await client.send(.get, "/v1/api-keys", token: org.ownerToken)
            #expect(!listed.text.contains(secret))
            #expect(!listed.text.contains(String(secret.split(separator: ".").last!)))

            let me = try await client.send(.get, "/v1/me", token: secret)
            #expect(try me.decoded(Components.Schemas.Principal.self).kind == .apiKey)
            #expect(
                try await client.send(.post, "/v1/users", token: secret, json: #"{"email": "via-key@x.example", "display_name": "K"}"#)
                    .status == .created)
            #expect(try await client.send(.get, "/v1/audit-log", token: secret).isProblem(.forbidden))
            // A key whose every call is refused has still been used: an administrator looking
            // for keys in use must see it (a trial's key, refused four times, looked unused).
            let refused = try await client.send(
                .post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "Refused", "role_id": "\#(serviceRole)"}"#
            ).decoded(Components.Schemas.ApiKeyCreated.self)
            #expect(try await client.send(.get, "/v1/audit-log", token: refused.secret).isProblem(.forbidden))
            let seen = try await client.send(.get, "/v1/api-keys/\(refused.id)", token: org.ownerToken)
            #expect(seen.json["last_used_at"] is String, "\(seen.text)")

            #expect(try await client.send(.delete, "/v1/api-keys/\(id)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.get, "/v1/me", token: secret).isProblem(.unauthorized))
            #expect(try await client.send(.get, "/v1/me", token: secret.dropLast(3) + "abc").isProblem(.unauthorized))
        }
    }

    @Test("a role held by a live API key cannot be deleted; once the key is revoked it can")
    func roleHeldByKey() async throws {
        try await withOrganisation { org, client in
            let role = try await client.send(
                .post, "/v1/roles", token: org.ownerToken,
                json: #"{"key": "integrator", "name": "Integrator", "permissions": ["users.read"]}"#)
            let roleID = try role.decoded(Components.Schemas.Role.self).id
            let key = try await client.send(.post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "k", "role_id": "\#(roleID)"}"#)
            let keyID = try key.decoded(Components.Schemas.ApiKeyCreated.self).id
            let blocked = try await client.send(.delete, "/v1/roles/\(roleID)", token: org.ownerToken)
            #expect(blocked.isProblem(.conflict), "\(blocked.text)")
            #expect(try await client.send(.delete, "/v1/api-keys/\(keyID)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.delete, "/v1/roles/\(roleID)", token: org.ownerToken).status == .noContent)
            // The revoked key went with the role, and the audit log says so.
            #expect(try await client.send(.get, "/v1/api-keys/\(keyID)", token: org.ownerToken).isProblem(.notFound))
            let audited = try await client.send(.get, "/v1/audit-log?target_id=\(keyID)", token: org.ownerToken)
            let actions = ((audited.json["items"] as? [[String: Any]]) ?? []).compactMap { $0["action"] as? String }
            #expect(actions.contains("apikey.delete") && actions.contains("apikey.revoke"), "\(actions)")
        }
    }

    @Test("a caller cannot change or deactivate someone who holds more than it does")
    func noEscalationThroughUserChanges() async throws {
        try await withOrganisation { org, client in
            let secret = try await serviceKey(org, client, name: "svc")
            let owner = org.ownerID.uuidString.lowercased()
            #expect(try await client.send(.post, "/v1/users/\(owner)/deactivate", token: secret).isProblem(.forbidden))
            #expect(
                try await client.send(.patch, "/v1/users/\(owner)", token: secret, json: #"{"email": "evil@x.example"}"#).isProblem(
                    .forbidden))
            // A member holds less than the service role: that is allowed.
            #expect(
                try await client.send(.patch, "/v1/users/\(org.memberID.uuidString)", token: secret, json: #"{"display_name": "M"}"#).status
                    == .ok)
        }
    }

    @Test("deactivating a user ends their sessions; nobody deactivates themselves")
    func deactivation() async throws {
        try await withOrganisation { org, client in
            let login = try await client.send(
                .post, "/v1/auth/token",
                json: """
                    {"organisation": "\(org.slug)", "email": "member@\(org.slug).example", "password": "\(TestOrganisation.password)"}
                    """)
            let refresh = try login.decoded(Components.Schemas.TokenPair.self).refreshToken
            let member = org.memberID.uuidString.lowercased()
            let deactivated = try await client.send(.post, "/v1/users/\(member)/deactivate", token: org.ownerToken)
            #expect(try deactivated.decoded(Components.Schemas.User.self).active == false)
            #expect(try await client.send(.post, "/v1/auth/refresh", json: #"{"refresh_token": "\#(refresh)"}"#).isProblem(.unauthorized))
            #expect(
                try await client.send(.post, "/v1/users/\(org.ownerID.uuidString)/deactivate", token: org.ownerToken).isProblem(.conflict))
            let reactivated = try await client.send(.post, "/v1/users/\(member)/reactivate", token: org.ownerToken)
            #expect(try reactivated.decoded(Components.Schemas.User.self).active == true)
        }
    }

    @Test("the organisation: anyone reads it, only organisation.manage changes it")
    func organisation() async throws {
        try await withOrganisation { org, client in
            let read = try await client.send(.get, "/v1/organisation", token: org.memberToken)
            #expect(try read.decoded(Components.Schemas.Organisation.self).slug == org.slug)
            let changed = try await client.send(
                .patch, "/v1/organisation", token: org.ownerToken, json: #"{"default_locale": "fr", "default_timezone": "Europe/Paris"}"#)
            #expect(try changed.decoded(Components.Schemas.Organisation.self).defaultTimezone == "Europe/Paris")
            #expect(
                try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"default_timezone": "Nowhere/City"}"#)
                    .isProblem(.unprocessableContent))
            #expect(try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"id": "x"}"#).isProblem(.badRequest))
        }
    }
}

@Suite("Operations endpoints")
struct OperationsTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    @Test("health, readiness and metrics answer without credentials; every response carries a request id")
    func endpoints() async throws {
        let app = try env.application()
        try await app.test(.router) { client in
            #expect(try await client.send(.get, "/healthz").status == .ok)
            let ready = try await client.send(.get, "/readyz")
            #expect(ready.status == .ok)
            #expect(try ready.decoded(Components.Schemas.Readiness.self).migrations.applied == TestEnvironment.migrationVersions.count)
            let echoed = try await client.send(.get, "/healthz", headers: [HTTPField.Name("X-Request-Id")!: "abc-123"])
            #expect(echoed.headers[HTTPField.Name("X-Request-Id")!] == "abc-123")
            let metrics = try await client.send(.get, "/metrics")
            #expect(metrics.text.contains("herald_http_requests_total"))
            #expect(metrics.text.contains("route=\"/healthz\""))
            let unknown = try await client.send(.get, "/nowhere")
            #expect(unknown.isProblem(.notFound))
        }
    }

    @Test("readiness is 503 while a migration this build ships is not applied")
    func notReadyWithPendingMigration() async throws {
        let app = try env.application(expectedMigrations: TestEnvironment.migrationVersions + [9999])
        try await app.test(.router) { client in
            let response = try await client.send(.get, "/readyz")
            #expect(response.isProblem(.serviceUnavailable))
            #expect((response.json["detail"] as? String)?.contains("herald migrate") == true)
        }
    }
}
