import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdTesting
import Testing

@testable import HeraldAPI

/// Issue 8 item 10: requests that `openapi.yaml` allows are accepted, and what it does not
/// describe is refused with a 400 naming it. scripts/contract.sh checks the rest with schemathesis.
@Suite("Issue 8: the contract")
struct ContractTests {
    @Test("an optional body may be left out (rotate-secret without a body reaches the endpoint lookup)")
    func optionalBodyLeftOut() async throws {
        // setup
        try await withOrganisation { org, client in
            // act
            let response = try await client.send(
                .post, "/v1/endpoints/\(UUID().uuidString.lowercased())/rotate-secret", token: org.ownerToken)
            // check: 404 for the unknown endpoint, not 400 for an empty body
            #expect(response.isProblem(.notFound), "\(response.text)")
        }
    }

    @Test("a field sent as null is refused with 400 naming it; null inside the client's own JSON is a value")
    func nullFields() async throws {
        // setup
        try await withOrganisation { org, client in
            let member = org.memberID.uuidString.lowercased()
            // act
            let field = try await client.send(.patch, "/v1/users/\(member)", token: org.ownerToken, json: #"{"locale": null}"#)
            let inside = try await client.send(
                .patch, "/v1/users/\(member)", token: org.ownerToken, json: #"{"attributes": {"team": null}}"#)
            // check
            #expect(field.isProblem(.badRequest) && field.text.contains("locale"), "\(field.text)")
            #expect(inside.status == .ok, "\(inside.text)")
        }
    }

    @Test("text with U+0000 is refused with 400, in a query and in a body, instead of a 500 from PostgreSQL")
    func nulInText() async throws {
        // setup
        try await withOrganisation { org, client in
            // act
            let query = try await client.send(.get, "/v1/users?q=a%00b", token: org.ownerToken)
            let body = try await client.send(.post, "/v1/groups", token: org.ownerToken, json: #"{"key": "g1", "name": "a\u0000b"}"#)
            // check
            #expect(query.isProblem(.badRequest), "\(query.text)")
            #expect(body.isProblem(.badRequest) && body.text.contains("name"), "\(body.text)")
        }
    }

    @Test("every RFC 3339 offset is read, also beyond Foundation's ±18:00")
    func farOffsets() async throws {
        // setup
        try await withOrganisation { org, client in
            // act
            let response = try await client.send(.get, "/v1/me/notifications?since=1970-01-01T19:54:00%2B19:54", token: org.memberToken)
            // check
            #expect(response.status == .ok, "\(response.text)")
        }
    }

    @Test("mark-read takes exactly one of ids and all; all: false is refused (the schema's enum)")
    func markReadAllFalse() async throws {
        // setup
        try await withOrganisation { org, client in
            // act
            let none = try await client.send(.post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"all": false}"#)
            let both = try await client.send(
                .post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"all": true, "ids": []}"#)
            // check
            #expect(none.isProblem(.unprocessableContent) || none.isProblem(.badRequest), "\(none.text)")
            #expect(both.isProblem(.unprocessableContent), "\(both.text)")
        }
    }

    @Test("the 201 of POST /v1/api-keys carries the secret beside the key's fields")
    func apiKeyCreatedHasSecret() async throws {
        // setup
        try await withOrganisation { org, client in
            let service = try await org.store { tx in try await tx.builtinRole(.service).id.uuidString.lowercased() }
            // act
            let response = try await client.send(
                .post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "CRM", "role_id": "\#(service)"}"#)
            // check: exactly the members of ApiKeyCreated
            #expect(response.status == .created)
            #expect(Set(response.json.keys) == ["id", "name", "role_id", "prefix", "created_at", "secret"], "\(response.text)")
        }
    }
}
