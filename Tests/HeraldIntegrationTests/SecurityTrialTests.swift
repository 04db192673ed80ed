import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// What a trial by a security-minded integrator (the README, the docs and the contract only, no
/// code) found: a filter dropped for a badly encoded value, a missing parameter named "body", an
/// exclusion that stored another organisation's user id.
@Suite("Trials: a security review's findings")
struct SecurityTrialTests {
    @Test("a query value that is not valid percent-encoding is a 400 naming it, never an unfiltered list")
    func badPercentEncoding() async throws {
        try await withCatalogue { org, _, client in
            for (path, name) in [
                ("/v1/users?q=memb%ZZ", "q"), ("/v1/users?q=%C3%28", "q"), ("/v1/me/notifications?limit=200&q=zzzz%ZZ", "q"),
                ("/v1/deliveries?event_id=%ZZ", "event_id"), ("/v1/events?type=%ZZ", "type"),
            ] {
                let token = path.hasPrefix("/v1/me/") ? org.memberToken : org.ownerToken
                let response = try await client.send(.get, path, token: token)
                #expect(response.isProblem(.badRequest), "\(path): \(response.text.prefix(300))")
                #expect(
                    response.text.contains("Query parameter \\\"\(name)\\\"") && response.text.contains("percent-encoding"),
                    "\(response.text)")
            }
            // Well encoded, the same search filters.
            let found = try await client.send(.get, "/v1/users?q=memb%65r", token: org.ownerToken)
            #expect(found.status == .ok && !found.text.contains("\"items\":[]"), "\(found.text.prefix(300))")
            let none = try await client.send(.get, "/v1/users?q=zz%7Azz", token: org.ownerToken)
            #expect(none.status == .ok && none.text.contains("\"items\":[]"), "\(none.text.prefix(300))")
        }
    }

    @Test("a required query parameter left out is named, whatever else the query holds")
    func missingRequiredParameter() async throws {
        try await withCatalogue { org, _, client in
            for path in ["/v1/notifications/debug", "/v1/notifications/debug?limit=5", "/v1/notifications/debug?user_id=\(org.memberID)"] {
                let response = try await client.send(.get, path, token: org.ownerToken)
                #expect(response.isProblem(.badRequest), "\(path): \(response.text.prefix(300))")
                #expect(response.json["detail"] as? String == "event: this query parameter is required.", "\(path): \(response.text)")
            }
        }
    }

    @Test("exclude_user_ids naming a user the organisation does not have is a 422, as user_ids is, and nothing is stored")
    func foreignExclusion() async throws {
        let other = try await TestOrganisation.make()
        try await withCatalogue { org, _, client in
            let before = try await client.send(.get, "/v1/events", token: org.ownerToken).text
            for audience in [
                #"{"everyone":true,"exclude_user_ids":["\#(other.memberID)"]}"#, #"{"everyone":true,"exclude_user_ids":["\#(UUID())"]}"#,
            ] {
                let sent = try await client.send(
                    .post, "/v1/events", token: org.ownerToken, json: #"{"type":"TASK_ASSIGNED","audience":\#(audience),"payload":{}}"#)
                #expect(sent.isProblem(.unprocessableContent), "\(sent.text.prefix(300))")
                #expect(sent.text.contains("exclude_user_ids"), "\(sent.text)")
                let dryRun = try await client.send(
                    .post, "/v1/events/dry-run", token: org.ownerToken,
                    json: #"{"type":"TASK_ASSIGNED","audience":\#(audience),"payload":{}}"#)
                #expect(dryRun.isProblem(.unprocessableContent), "\(dryRun.text.prefix(300))")
                let schedule = try await client.send(
                    .post, "/v1/schedules", token: org.ownerToken,
                    json: #"{"name":"x","rule":"FREQ=DAILY","event":{"type":"TASK_ASSIGNED","audience":\#(audience),"payload":{}}}"#)
                #expect(
                    schedule.isProblem(.unprocessableContent) && schedule.text.contains("exclude_user_ids"), "\(schedule.text.prefix(300))")
            }
            #expect(try await client.send(.get, "/v1/events", token: org.ownerToken).text == before)
            // The organisation's own user is excluded as before.
            let sent = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type":"TASK_ASSIGNED","audience":{"everyone":true,"exclude_user_ids":["\#(org.memberID)"]},"payload":{}}"#)
            #expect(sent.status == .accepted, "\(sent.text.prefix(300))")
        }
    }
}
