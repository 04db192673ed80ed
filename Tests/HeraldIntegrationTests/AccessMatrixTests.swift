import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdTesting
import Testing

@testable import HeraldAPI

/// Driven by openapi.yaml itself: every operation is served, declares its permission, refuses
/// callers without it, and answers another organisation's ids exactly like missing ones.
@Suite("Access matrix over every operation in openapi.yaml")
struct AccessMatrixTests {
    let env: TestEnvironment
    let operations: [SpecOperation]

    init() async throws {
        env = try await TestEnvironment.shared
        operations = try Spec.operations()
    }

    /// The path with every `{param}` replaced by `ids[param]` (or a fresh UUID; a channel and a
    /// locale, which are not ids, get valid values).
    func path(_ op: SpecOperation, _ ids: [String: String] = [:]) -> String {
        var path = op.path
        for (name, value) in ids.merging(["channel": "in_app", "locale": "en"], uniquingKeysWith: { a, _ in a }) {
            path = path.replacingOccurrences(of: "{\(name)}", with: value)
        }
        while let open = path.firstIndex(of: "{"), let close = path[open...].firstIndex(of: "}") {
            path.replaceSubrange(open...close, with: UUID().uuidString.lowercased())
        }
        return path
    }

    func method(_ op: SpecOperation) -> HTTPRequest.Method { HTTPRequest.Method(op.method)! }

    @Test("the spec and the permission table name the same operations with the same rules")
    func specMatchesTable() throws {
        #expect(Set(operations.map(\.id)) == Set(RoutePermissions.table.keys))
        #expect(operations.count == RoutePermissions.table.count, "an operationId appears twice")
        for op in operations {
            let expected: AccessRule? =
                switch op.permission {
                case "public": .public
                case "authenticated": .authenticated
                default: Permission(rawValue: op.permission).map(AccessRule.permission)
                }
            #expect(expected != nil, "\(op.id): x-permission \"\(op.permission)\" is not a rule")
            #expect(RoutePermissions.table[op.id] == expected, "\(op.id): spec says \(op.permission)")
        }
    }

    @Test("every operation is served, and each one that needs a credential refuses a request without one")
    func everyOperationServed() async throws {
        let app = try env.application()
        try await app.test(.router) { client in
            for op in operations {
                let response = try await client.send(method(op), path(op), json: op.exampleBody)
                let noRoute = response.status == .notFound && response.text.contains("There is no operation")
                #expect(!noRoute, "\(op.id) \(op.method) \(op.path) is not served")
                if op.permission != "public" {
                    #expect(response.isProblem(.unauthorized), "\(op.id) without a credential answered \(response.status)")
                    #expect(response.headers[.wwwAuthenticate] == "Bearer")
                }
            }
        }
    }

    @Test("each operation that needs a permission answers 403 to a caller without it")
    func forbiddenWithoutPermission() async throws {
        try await withOrganisation { org, client in
            for op in operations {
                guard let permission = Permission(rawValue: op.permission) else { continue }
                // Members hold only notifications.read and preferences.manage.
                guard !BuiltinRole.member.permissions.contains(permission) else { continue }
                let response = try await client.send(method(op), path(op), token: org.memberToken, json: op.exampleBody)
                #expect(response.isProblem(.forbidden), "\(op.id) answered \(response.status) to a member")
                #expect(response.text.contains(permission.rawValue))
            }
        }
    }

    /// Fresh rows of every kind an operation's path can name, in `org` (which has the test
    /// catalogue); the notification belongs to the organisation's owner.
    func resources(in org: TestOrganisation, for operation: String = "") async throws -> [String: String] {
        let (event, plan) = try await org.notify(
            EventRequest(
                typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.ownerID]),
                payload: .object(["isq": .number(20)])))
        let notification = try #require(plan.notifications.first { $0.userID == org.ownerID }).id
        let delivery = try #require(plan.deliveries.first).id
        // A retry needs a delivery that has stopped; a cancel one that has not gone out.
        if operation == "retryDelivery" { _ = try await org.store { tx in try await tx.cancelDelivery(delivery) } }
        // A digest run exists once the workers made one; a retry needs one that did not go.
        let run =
            operation == "retryDigestRun"
            ? try await org.digestRun(
                of: org.memberID, slot: Date().addingTimeInterval(-60), ending: .dead(responseCode: 550, error: "refused"))
            : UUID()
        let ids: [String: UUID] = try await org.store { tx in
            let suffix = UUID().uuidString.prefix(6).lowercased()
            let category = try await tx.createCategory(key: "c-\(suffix)", name: "C", description: "", critical: false)
            let type = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "T_\(suffix)", categoryID: try #require(try await tx.category(key: "activity")).id, name: "T", description: "",
                    defaultSeverity: .info, defaultPriority: .normal, defaultChannels: [.inApp]))
            try await tx.putTemplate(typeID: type.id, channel: .inApp, locale: "en", content: TemplateContent(subject: "s", body: "b"))
            let user = try await tx.createUser(NewUser(email: "u-\(UUID().uuidString.prefix(6))@x.example", displayName: "U"))
            let role = try await tx.createRole(
                key: "r-\(UUID().uuidString.prefix(6).lowercased())", name: "R", description: "", permissions: [.usersRead])
            let group = try await tx.createGroup(key: "g-\(UUID().uuidString.prefix(6).lowercased())", name: "G", description: "")
            try await tx.addGroupMember(group.id, user.id)
            let service = try await tx.builtinRole(.service)
            let key = OpaqueToken(kind: .apiKey, organisationID: org.id)
            _ = try await tx.createApiKey(id: key.id, name: "k", roleID: service.id, secretHash: key.secretHash, expiresAt: nil)
            // The schedule sends a type of its own: a type a schedule sends cannot be deleted.
            let scheduled = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "S_\(suffix)", categoryID: type.categoryID, name: "S", description: "",
                    defaultSeverity: .info, defaultPriority: .normal, defaultChannels: [.inApp]))
            let endpoint = try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "e", url: "https://93.184.216.34/hook",
                eventTypes: [], secret: WebhookSecret.generate().string)
            return [
                "userId": user.id, "roleId": role.id, "groupId": group.id, "keyId": key.id, "categoryId": category.id,
                "typeId": type.id, "eventId": event.id, "notificationId": notification, "deliveryId": delivery, "endpointId": endpoint.id,
                "jobId": try await tx.job(named: .retention).id, "runId": run,
                "scheduleId": try await tx.createSchedule(
                    id: UUID(), name: "s",
                    // The owner: a schedule naming the path's user would keep it from being deleted.
                    event: EventRequest(typeKey: scheduled.key, audience: Audience(userIDs: [org.ownerID]), payload: .object([:])),
                    rule: "FREQ=DAILY", timeZone: "UTC", startsAt: Date(), nextAt: Date().addingTimeInterval(86_400)
                ).id,
            ]
        }
        return ids.mapValues { $0.uuidString.lowercased() }
    }

    /// Bodies that succeed in the caller's own organisation where the spec's example would not
    /// (it names example ids).
    func body(_ op: SpecOperation) -> String? {
        switch op.id {
        case "setUserRoles": #"{"role_ids": []}"#
        default: op.exampleBody
        }
    }

    @Test("every operation on an id: own organisation 2xx, another organisation's id and a missing id the same 404")
    func otherOrganisationsIdsAreMissing() async throws {
        let a = try await TestOrganisation.make()
        let b = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: a)
        _ = try await TestCatalogue.make(in: b)
        let app = try env.application()
        // Signed-link routes carry a token, not an id; DeliveryTests covers their 404s. A digest
        // template is named by its locale in the caller's own organisation, not by an id
        // (DigestTests covers it).
        let withIDs = operations.filter { $0.path.contains("Id}") }
        #expect(withIDs.count >= 15)
        try await app.test(.router) { client in
            for op in withIDs {
                let own = try await client.send(
                    method(op), path(op, try await resources(in: a, for: op.id)), token: a.ownerToken, json: body(op))
                #expect((200..<300).contains(own.status.code), "\(op.id) in its own organisation answered \(own.status): \(own.text)")

                let foreign = try await client.send(
                    method(op), path(op, try await resources(in: b, for: op.id)), token: a.ownerToken, json: body(op))
                let missing = try await client.send(method(op), path(op), token: a.ownerToken, json: body(op))
                #expect(foreign.isProblem(.notFound), "\(op.id) with another organisation's id answered \(foreign.status)")
                #expect(missing.isProblem(.notFound), "\(op.id) with a missing id answered \(missing.status)")
                #expect(foreign.text == missing.text, "\(op.id): the 404 bodies differ")
            }
        }
    }

    @Test("lists never show another organisation's rows")
    func listsAreConfined() async throws {
        let a = try await TestOrganisation.make()
        let b = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: b)
        let bIDs = try await resources(in: b)
        let app = try env.application()
        try await app.test(.router) { client in
            for list in [
                "/v1/users", "/v1/roles", "/v1/groups", "/v1/api-keys", "/v1/audit-log", "/v1/categories",
                "/v1/notification-types", "/v1/events", "/v1/me/notifications", "/v1/deliveries",
            ] {
                // The largest page where the list is paged (an undeclared parameter is a 400).
                let paged = SpecRoutes.operations.contains { $0.method == "GET" && $0.path == list && $0.query.contains("limit") }
                let response = try await client.send(.get, list + (paged ? "?limit=200" : ""), token: a.ownerToken)
                #expect(response.status == .ok)
                for id in bIDs.values { #expect(!response.text.contains(id), "\(list) shows B's \(id)") }
                #expect(!response.text.contains(b.ownerID.uuidString.lowercased()))
            }
        }
    }
}
