fn main() {
    println!("qdistill");
}
